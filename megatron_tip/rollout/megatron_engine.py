"""Native sampling with the student's own megatron model (the CPU default engine).

Two paths, the same tokens:
- PP=1: megatron-core's static KV cache (``StaticInferenceContext``). The batch is prefilled up
  to its shortest prompt, then decoded one position at a time; rows still inside their (longer)
  prompt take the prompt token instead of a sample, as megatron's own static-batch generator does.
- PP>1: sequences are right-padded and the whole prefix is recomputed at each step through the
  pipeline schedule (O(T^2), exact at any layout: right padding never leaks into real positions).
TP ranks gather the (small) [B, V] last-position logits and sample with identical per-row
generators, so every TP rank holds the same tokens; PP stages get the tokens by broadcast.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

from megatron_tip.models.forward import output_positions, run_microbatches
from megatron_tip.rollout.base import EngineBase, Rollout, SamplingParams
from megatron_tip.seeding import derive_seed


def sample_next(logits: torch.Tensor, *, temperature: float, top_p: float,
                generators: list[torch.Generator], noise: torch.Tensor | None = None) -> torch.Tensor:
    """Sample one token per row from full-vocab logits [B, V] (fp32); greedy at temperature 0.

    ``noise`` [B, V]: each row's Exp(1) draw from ``RowNoise``; the tokens are then those of
    ``torch.multinomial(probs[i], 1, generator=g)``, which draws the same noise and takes
    argmax(p / q) (its one-sample path), but in one batched op instead of one call per row."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        cum = sorted_p.cumsum(dim=-1)
        drop = cum - sorted_p >= top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    if noise is not None:
        return (probs / noise).argmax(dim=-1)
    return torch.stack([torch.multinomial(probs[i], 1, generator=g)[0] for i, g in enumerate(generators)])


class RowNoise:
    """Each row's Exp(1) sampling noise, drawn from its own generator in blocks of draws.

    One ``exponential_`` call per row per block gives the same stream as one call per draw
    (tests/unit/test_row_noise.py), so a row's k-th token is unchanged while the per-token,
    per-row calls go away. CPU generators only (a CUDA generator's offsets differ per call).
    Memory: at most ``budget`` floats ([B, block, V])."""

    def __init__(self, gens: list[torch.Generator], *, vocab: int, max_draws: int, device,
                 budget: int = 1 << 24, block: int = 16) -> None:
        self.gens = gens
        # Blocks of 16 draws: rows that stop early (EOS) draw little noise they never use.
        self.block = max(1, min(max_draws, block, budget // max(len(gens) * vocab, 1)))
        self.buf = torch.empty(len(gens), self.block, vocab, device=device)
        for r, g in enumerate(gens):
            self.buf[r].exponential_(1, generator=g)
        self.base = torch.zeros(len(gens), dtype=torch.long, device=device)  # draw index of buf[r, 0]

    def take(self, rows: torch.Tensor, draw: torch.Tensor) -> torch.Tensor:
        """Noise [n, V] for ``rows`` [n] at their draw indices ``draw`` [n] (each used once, in order)."""
        off = draw - self.base[rows]
        for r in rows[off >= self.block].tolist():  # a row's block is used up: draw its next one
            self.buf[r].exponential_(1, generator=self.gens[r])
            self.base[r] += self.block
        return self.buf[rows, draw - self.base[rows]]


class MegatronEngine(EngineBase):
    """Rollout engine over a (possibly TP/PP-sharded) megatron GPTModel stage."""

    shares_training_weights = True  # samples with the training model itself: nothing to sync

    def __init__(self, model: torch.nn.Module, *, ctx, vocab_size: int, pad_id: int,
                 micro_batch_size: int | None = None, lean_decode: bool = True) -> None:
        self.model = model
        self.lean_decode = lean_decode  # PP=1: rollout.kv_decoder where it supports the model
        self.ctx = ctx
        self.vocab_size = vocab_size
        self.pad_id = pad_id
        self.micro_batch_size = micro_batch_size  # rows per decode batch; None: all rows of a call

    def sync_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """No-op: the engine samples with the training model's own parameters."""

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Rollout]:
        """Sample ``params.n`` responses per prompt; returns prompt-major rollouts."""
        rows = [(i, j) for i in range(len(prompts)) for j in range(params.n)]
        size = self.micro_batch_size or max(len(rows), 1)
        out: list[Rollout] = []
        for start in range(0, len(rows), size):
            out.extend(self._generate_rows(prompts, rows[start:start + size], params))
        return out

    def _last_logits(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor | None:
        """Full-vocab fp32 logits [B, V_true] at each row's last real position (last stage only)."""
        b, s = ids.shape
        index = (torch.arange(b, device=ids.device), lengths - 1)
        mb = {"input_ids": ids, "position_ids": torch.arange(s, device=ids.device).unsqueeze(0).expand(b, -1)}
        got: list[torch.Tensor] = []

        def on_output(_mb, logits):  # [1, B, V/TP]
            got.append(logits[0].float())
            return logits.new_zeros(()), torch.zeros((), dtype=torch.int, device=logits.device), {}

        self.model.eval()
        run_microbatches(self.model, [mb], on_output, forward_only=True,
                         prepare=lambda _mb: output_positions(self.model, index))
        return self._gather_vocab(got[0]) if got else None

    @staticmethod
    def _draw(logits: torch.Tensor, gens: list[torch.Generator], params: SamplingParams,
              noise: torch.Tensor | None = None):
        """Sample rows of [n, V] logits with their own generators; returns (tokens, log-probs).

        Only rows that really generate draw, so a row's random stream does not depend on the
        other rows of the batch or on the engine path. Log-probs are the model's own
        (temperature 1), as vLLM reports them."""
        nxt = sample_next(logits, temperature=params.temperature, top_p=params.top_p, generators=gens, noise=noise)
        lp = torch.log_softmax(logits, dim=-1)
        return nxt, lp.gather(1, nxt[:, None])[:, 0]

    def _gather_vocab(self, local: torch.Tensor) -> torch.Tensor:
        """[B, V/TP] fp32 shard -> [B, V_true] (all TP ranks)."""
        if self.ctx.tp > 1:
            shards = [torch.empty_like(local) for _ in range(self.ctx.tp)]
            dist.all_gather(shards, local.contiguous(), group=self.ctx.tp_group)
            local = torch.cat(shards, dim=-1)
        return local[:, : self.vocab_size]

    def _generate_rows(self, prompts, rows, params: SamplingParams) -> list[Rollout]:
        if self.ctx.pp == 1:
            return self._generate_rows_kv(prompts, rows, params)
        return self._generate_rows_recompute(prompts, rows, params)

    def _batch(self, prompts, rows, params: SamplingParams):
        """Right-padded [B, T] ids with each row's prompt, prompt lengths, per-row generators."""
        dev = self.ctx.device
        lengths = [len(prompts[i]) for i, _ in rows]
        host = torch.full((len(rows), max(lengths) + params.max_new_tokens), self.pad_id, dtype=torch.long,
                          device="cpu")  # filled row by row on the host, then moved once
        for r, (i, _) in enumerate(rows):
            host[r, : lengths[r]] = torch.tensor(prompts[i], dtype=torch.long, device="cpu")
        gens = [torch.Generator(device=dev).manual_seed(derive_seed(params.seed, i, j)) for i, j in rows]
        stop = torch.tensor(list(params.stop_token_ids) or [-1], device=dev)
        return host.to(dev), torch.tensor(lengths, device=dev), gens, stop

    def _kv_forward(self, batch: int, total: int):
        """``(forward, keep)``: ``forward(ids [B, s]) -> fp32 logits [B, V_true]`` at the last new
        position, with a KV cache over ``total`` positions; ``keep(rows)`` drops the other rows from
        the batch (None: it cannot). ``KVDecoder`` where it supports the model (the same logits,
        less overhead), else megatron-core's ``StaticInferenceContext`` (no ``keep``)."""
        from megatron_tip.rollout.kv_decoder import KVDecoder, unsupported

        if self.lean_decode and unsupported(self.model) is None:
            dec = KVDecoder(self.model, batch=batch, max_len=total)
            return (lambda ids: self._gather_vocab(dec.step(ids))), dec.keep
        from megatron.core.inference.contexts import StaticInferenceContext

        cache = StaticInferenceContext(batch, total)
        pos = torch.arange(total, device=self.ctx.device).unsqueeze(0).expand(batch, -1)

        def forward(ids):
            s0 = cache.sequence_len_offset
            if s0 > 0:
                cache.enable_decode_mode()
            # megatron's inference path gathers the TP vocab shards itself (runtime_gather_output).
            logits = self.model(ids, pos[:, s0:s0 + ids.shape[1]], None, inference_context=cache,
                                runtime_gather_output=True)
            cache.increment_sequence_len_offset(ids.shape[1])
            return logits[:, -1, : self.vocab_size].float()
        return forward, None

    def _generate_rows_kv(self, prompts, rows, params: SamplingParams) -> list[Rollout]:
        ids, plens, gens, stop = self._batch(prompts, rows, params)
        b, total = ids.shape
        # Each row's log-probs in draw order, read back once at the end (no per-token Python work).
        lps = torch.zeros(b, params.max_new_tokens, device=ids.device)
        drawn = torch.zeros(b, dtype=torch.long, device=ids.device)
        ends = plens + params.max_new_tokens  # exclusive end of each row
        done = torch.zeros(b, dtype=torch.bool, device=ids.device)
        noise = (RowNoise(gens, vocab=self.vocab_size, max_draws=params.max_new_tokens, device=ids.device)
                 if params.temperature > 0 and ids.device.type == "cpu" else None)
        self.model.eval()
        forward, keep = self._kv_forward(b, total)
        # The decode batch holds rows ``alive`` (row r at position slot[r]); finished rows leave it.
        alive = torch.arange(b, device=ids.device)
        slot = alive.clone()
        start = int(plens.min())
        full = forward(ids[:, :start])
        for t in range(start, total):
            sampling = (t >= plens) & ~done & (t < ends)
            rows_now = sampling.nonzero()[:, 0]
            if rows_now.numel():
                k = t - plens[rows_now]  # each sampling row's draw index
                logits = full[slot[rows_now]]
                if noise is not None:
                    nxt, chosen = self._draw(logits, [], params, noise.take(rows_now, k))
                else:
                    nxt, chosen = self._draw(logits, [gens[r] for r in rows_now.tolist()], params)
                ids[rows_now, t] = nxt
                lps[rows_now, k] = chosen
                drawn[rows_now] += 1
                done[rows_now] |= torch.isin(nxt, stop)
            finished = done | (t + 1 >= ends)
            if bool(finished.all()) or t + 1 == total:
                break
            if keep is not None:
                alive = self._shrink(alive, finished, keep, slot)
            full = forward(ids[alive, t:t + 1])
        out = []
        counts, starts, ids_h, lps_h, fin = drawn.tolist(), plens.tolist(), ids.tolist(), lps.tolist(), done.tolist()
        for r, (i, _) in enumerate(rows):
            n, p0 = counts[r], starts[r]
            out.append(Rollout(prompt_index=i, prompt_ids=list(prompts[i]), response_ids=ids_h[r][p0:p0 + n],
                               logprobs=lps_h[r][:n], finished=fin[r]))
        return out

    @staticmethod
    def _shrink(alive: torch.Tensor, finished: torch.Tensor, keep, slot: torch.Tensor) -> torch.Tensor:
        """Once at most 3/4 of the decode batch still generates, drop its finished rows (keeping at
        least ``kv_decoder.MIN_ROWS``): a decode step costs about its rows. Updates ``slot``; returns
        the new ``alive`` [n]. Every TP rank holds the same tokens, so all shrink alike."""
        from megatron_tip.rollout.kv_decoder import MIN_ROWS

        n = alive.numel()
        fin = finished[alive]
        live = int((~fin).sum())
        if n <= MIN_ROWS or live > n * 3 // 4:
            return alive
        pos = (~fin).nonzero()[:, 0]
        if live < MIN_ROWS:  # fill up with finished rows (their logits are never read)
            pos = torch.cat([pos, fin.nonzero()[:MIN_ROWS - live, 0]]).sort().values
        keep(pos)
        alive = alive[pos]
        slot[alive] = torch.arange(alive.numel(), device=alive.device)
        return alive

    def _generate_rows_recompute(self, prompts, rows, params: SamplingParams) -> list[Rollout]:
        ids, plens, gens, stop = self._batch(prompts, rows, params)
        b = ids.shape[0]
        lengths = plens.clone()
        done = torch.zeros(b, dtype=torch.bool, device=ids.device)
        logprobs: list[list[float]] = [[] for _ in range(b)]
        last_stage_rank = dist.get_global_rank(self.ctx.pp_group, self.ctx.pp - 1) if self.ctx.pp > 1 else None
        for _ in range(params.max_new_tokens):
            width = int(lengths.max())
            logits = self._last_logits(ids[:, :width], lengths)
            nxt = torch.zeros(b, dtype=torch.long, device=ids.device)
            if logits is not None:  # last stage: draw for the rows still generating
                live = (~done).nonzero()[:, 0]
                drawn, chosen = self._draw(logits[live], [gens[r] for r in live.tolist()], params)
                nxt[live] = drawn
                for k, r in enumerate(live.tolist()):
                    logprobs[r].append(float(chosen[k]))
            if last_stage_rank is not None:
                dist.broadcast(nxt, src=last_stage_rank, group=self.ctx.pp_group)
            active = ~done
            ids[active, lengths[active]] = nxt[active]
            lengths = lengths + active.long()
            done = done | (active & torch.isin(nxt, stop))
            if bool(done.all()):
                break
        out = []
        for r, (i, _) in enumerate(rows):
            resp = ids[r, plens[r]: lengths[r]].tolist()
            out.append(Rollout(prompt_index=i, prompt_ids=list(prompts[i]), response_ids=resp,
                               logprobs=logprobs[r] if logits is not None else None,
                               finished=bool(done[r])))
        return out
