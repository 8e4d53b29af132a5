"""On-policy distillation with TIP token selection: one step reads as the algorithm.

    rollouts  -> teacher hidden states (no grad) -> student scoring + token stats (no grad)
              -> selection (global-batch statistics) -> gradient pass on kept positions only
              -> optimizer step -> weight sync to the rollout engine

Memory: the scoring pass runs both decoders without their output layers and computes logits
from the final hidden states ``score_chunk_tokens`` rows at a time; only the teacher's hidden
states [S, B, H] are kept. The gradient pass applies both output layers only at kept positions,
so logits memory scales with the keep ratio (DESIGN §1).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megatron_tip.config import RunConfig
from megatron_tip.data import PackedBatch, pack_rollouts
from megatron_tip.distributed import ParallelContext
from megatron_tip.loss import kept_reverse_kl_loss
from megatron_tip.models.forward import capture_hidden, output_logits, output_positions, run_microbatches
from megatron_tip.ops import vocab_parallel_token_stats
from megatron_tip.rollout.base import SamplingParams
from megatron_tip.selection import select_tokens
from megatron_tip.run_setup import TrainingSetup


@dataclass
class ScoredBatch:
    """Everything the gradient pass needs from the scoring pass (last stage holds the stats)."""

    packed: PackedBatch
    microbatches: list[dict]
    teacher_hidden: list[torch.Tensor]  # per micro-batch [S, b, H] (last stage; else empty)
    stats: Optional[dict[str, torch.Tensor]]  # [B, S] fp32 each (last stage; else None)


class Trainer:
    """Drives the OPD loop over a ``TrainingSetup`` (models, optimizer, engine, data, logger)."""

    def __init__(self, cfg: RunConfig, ctx: ParallelContext, setup: TrainingSetup) -> None:
        self.cfg, self.ctx, self.s = cfg, ctx, setup
        self.skipped_steps = 0

    # ---- 1. rollouts ---------------------------------------------------------------------------
    def rollouts(self, step: int) -> tuple[list, list]:
        cfg, ctx = self.cfg, self.ctx
        per_rank = cfg.train.prompts_per_step // ctx.dp
        prompts = self.s.dataset.batch(step, size=cfg.train.prompts_per_step)
        mine = prompts[ctx.dp_rank * per_rank:(ctx.dp_rank + 1) * per_rank]
        params = SamplingParams(
            n=cfg.rollout.samples_per_prompt, temperature=cfg.rollout.temperature,
            top_p=cfg.rollout.top_p, max_new_tokens=cfg.rollout.max_new_tokens,
            seed=cfg.train.seed * 1_000_003 + step * 7919 + ctx.dp_rank, stop_token_ids=self.s.stop_ids)
        return mine, self.s.engine.generate([p.ids for p in mine], params)

    def microbatches(self, packed: PackedBatch) -> list[dict]:
        """Split [B, S] into equal micro-batches (the pipeline schedule needs one shape)."""
        mbs, b = self.cfg.train.micro_batch_size, packed.input_ids.shape[0]
        out = []
        for start in range(0, b, mbs):
            sl = slice(start, min(start + mbs, b))
            mb = {"input_ids": packed.input_ids[sl], "position_ids": packed.position_ids[sl],
                  "target_ids": packed.target_ids[sl], "valid": packed.valid[sl], "rows": sl}
            short = mbs - mb["input_ids"].shape[0]
            if short:  # pad with all-pad rows that count nowhere
                for k in ("input_ids", "position_ids", "target_ids", "valid"):
                    mb[k] = torch.cat([mb[k], mb[k][:1].expand(short, -1).clone()])
                mb["valid"][-short:] = False
            out.append(mb)
        return out

    # ---- 2. teacher + student scoring (no grad) ----------------------------------------------
    @torch.no_grad()
    def score(self, packed: PackedBatch) -> ScoredBatch:
        s = self.s
        mbs = self.microbatches(packed)
        teacher_hidden = self._final_hidden(s.teacher, mbs)  # kept for the gradient pass
        student_hidden = self._final_hidden(s.student, mbs)  # dropped after scoring
        stats_rows = [self._token_stats(mb, hs, ht) for mb, hs, ht in zip(mbs, student_hidden, teacher_hidden)]
        stats = None
        if stats_rows:
            b = packed.input_ids.shape[0]
            stats = {k: torch.cat([r[k] for r in stats_rows])[:b] for k in stats_rows[0]}
        return ScoredBatch(packed, mbs, teacher_hidden, stats)

    def _final_hidden(self, model, mbs: list[dict]) -> list[torch.Tensor]:
        """Final hidden states [S, b, H] per micro-batch (last stage); no logits are computed."""
        hidden: list[torch.Tensor] = []
        empty = (torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
        dummy = lambda mb, out: (out.sum() * 0, torch.tensor(0, dtype=torch.int), {})  # noqa: E731
        with capture_hidden(model, hidden):
            run_microbatches(model, mbs, dummy, forward_only=True,
                             prepare=lambda mb: output_positions(model, empty))
        return hidden

    def _token_stats(self, mb: dict, hs: torch.Tensor, ht: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-token stats of one micro-batch; logits exist only ``score_chunk_tokens`` rows at a time."""
        s, ctx = self.s, self.ctx
        hs, ht = (h.transpose(0, 1).reshape(-1, h.shape[-1]) for h in (hs, ht))  # [b*S, H], row-major
        targets = mb["target_ids"].reshape(-1)
        step = self.cfg.train.score_chunk_tokens
        parts = []
        for i in range(0, hs.shape[0], step):
            st = vocab_parallel_token_stats(
                output_logits(s.student, hs[i:i + step]), output_logits(s.teacher, ht[i:i + step]),
                tp_group=ctx.tp_group, vocab_size=s.vocab_size, chunk_size=self.cfg.train.stats_chunk_size,
                target_ids=targets[i:i + step])
            parts.append(st)
        shape = mb["input_ids"].shape
        return {k: torch.cat([getattr(p, k) for p in parts]).reshape(shape) for k in
                ("norm_entropy", "reverse_kl", "forward_kl", "teacher_entropy", "target_logprob")}

    # ---- 4. gradient pass on kept positions ----------------------------------------------------
    def gradient_pass(self, scored: ScoredBatch, mask: Optional[torch.Tensor]) -> None:
        s, ctx = self.s, self.ctx
        index_of = []
        for mb in scored.microbatches:
            if mask is None:  # non-last PP stage: no output layer here
                index_of.append(None)
                continue
            m = torch.zeros_like(mb["valid"])
            rows = mask[mb["rows"]]
            m[: rows.shape[0]] = rows
            b_idx, s_idx = m.nonzero(as_tuple=True)
            index_of.append((b_idx, s_idx))
        position = {id(mb): i for i, mb in enumerate(scored.microbatches)}

        def prepare(mb):
            return output_positions(s.student, index_of[position[id(mb)]])

        def on_output(mb, logits):  # [1, n, V/TP] at kept positions
            i = position[id(mb)]
            b_idx, s_idx = index_of[i]
            t_hidden = scored.teacher_hidden[i][s_idx, b_idx]  # [n, H]
            with torch.no_grad():
                t_logits = output_logits(s.teacher, t_hidden)
            return kept_reverse_kl_loss(logits[0], t_logits, tp_group=ctx.tp_group,
                                        vocab_size=s.vocab_size, chunk_size=self.cfg.train.stats_chunk_size)

        s.student.train()
        s.student.zero_grad_buffer()
        s.optimizer.zero_grad()
        run_microbatches(s.student, scored.microbatches, on_output, forward_only=False, prepare=prepare)

    # ---- one step ---------------------------------------------------------------------------------
    def train_step(self, step: int) -> dict[str, float]:
        ctx, s, cfg = self.ctx, self.s, self.cfg
        t0 = time.perf_counter()
        prompts, rollouts = self.rollouts(step)
        packed = pack_rollouts(rollouts, pad_id=s.pad_id)
        t1 = time.perf_counter()
        scored = self.score(packed)
        t2 = time.perf_counter()

        # NaN/inf anywhere must skip the step on *every* rank (selection would raise otherwise).
        bad = torch.zeros(1)
        if scored.stats is not None:
            v = packed.valid
            bad[0] = float(any(not torch.isfinite(t[v]).all() for k, t in scored.stats.items()
                               if k != "target_logprob"))
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item() > 0:
            return self._skip(step, "non-finite token statistics")

        metrics: dict[str, float] = {}
        mask = None
        if scored.stats is not None:
            st = scored.stats
            sel = select_tokens(cfg.selection, norm_entropy=st["norm_entropy"], reverse_kl=st["reverse_kl"],
                                forward_kl=st["forward_kl"], valid=packed.valid, group=ctx.dp_group, step=step)
            mask = sel.mask
            metrics.update(sel.metrics)
            metrics.update(self._teacher_entropy(st, packed.valid))
            if cfg.train.dump_token_stats and step == cfg.train.steps - 1 and ctx.dp_rank == 0 and ctx.tp_rank == 0:
                self._dump_token_stats(step, st, packed.valid, sel)
        metrics = self._from_last_stage(metrics)  # every rank logs the same selection metrics
        # Megatron divides gradients by the global kept count: with none kept there is no step.
        if metrics.get("n_kept", 0.0) == 0:
            return self._skip(step, "no token selected")
        t3 = time.perf_counter()
        lr = s.optimizer.param_groups[0]["lr"]  # the rate this step's update uses
        self.gradient_pass(scored, mask)
        ok, grad_norm, _ = s.optimizer.step()
        s.scheduler.step(increment=1)
        t4 = time.perf_counter()
        s.sync_engine_weights()
        t5 = time.perf_counter()

        metrics.update(s.rollout_metrics(prompts, rollouts, packed))
        metrics.update(self._loss_from_stats(scored, mask))
        n_tokens = float(packed.valid.sum())
        metrics.update({
            "step": step, "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else math.nan,
            "update_ok": float(bool(ok)), "skipped_steps": float(self.skipped_steps),
            "time_rollout_s": t1 - t0, "time_score_s": t2 - t1, "time_select_s": t3 - t2,
            "time_train_s": t4 - t3, "time_sync_s": t5 - t4,
            "rollout_tokens_per_s": n_tokens / max(t1 - t0, 1e-9),
            "score_tokens_per_s": n_tokens / max(t2 - t1, 1e-9),
            "train_tokens_per_s": n_tokens / max(t4 - t3, 1e-9),
            "peak_memory_gb": s.peak_memory_gb(),
        })
        return metrics

    def _from_last_stage(self, metrics: dict[str, float]) -> dict[str, float]:
        """With PP>1 only the last stage scores and selects; its metrics go to every stage."""
        if self.ctx.pp == 1:
            return metrics
        box = [metrics]
        dist.broadcast_object_list(box, src=dist.get_global_rank(self.ctx.pp_group, self.ctx.pp - 1),
                                   group=self.ctx.pp_group)
        return box[0]

    def _skip(self, step: int, why: str) -> dict[str, float]:
        """Count a skipped step (every rank reaches this together) and say why once."""
        self.skipped_steps += 1
        if self.ctx.rank == 0:
            print(f"step {step}: skipped ({why}); {self.skipped_steps} skipped so far", flush=True)
        return {"step": step, "skipped": 1.0, "skipped_steps": float(self.skipped_steps)}

    # ---- held-out evaluation ----------------------------------------------------------------------
    def evaluate(self, dataset, *, limit: int, samples: int = 1, temperature: float = 1.0) -> dict[str, float]:
        """Accuracy of the student on up to ``limit`` held-out prompts (graded, DP-sharded)."""
        ctx, s = self.ctx, self.s
        prompts = dataset.prompts[:limit]
        mine = prompts[ctx.dp_rank::ctx.dp]
        params = SamplingParams(n=samples, temperature=temperature, top_p=1.0,
                                max_new_tokens=self.cfg.rollout.max_new_tokens,
                                seed=self.cfg.train.seed + 99_991, stop_token_ids=s.stop_ids)
        rollouts = s.engine.generate([p.ids for p in mine], params) if mine else []
        correct = s.count_correct(rollouts, mine)
        t = torch.tensor([float(correct), float(len(rollouts))], dtype=torch.float64)
        dist.all_reduce(t, group=ctx.dp_group)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # all PP stages report the same numbers
        tag = "greedy" if temperature == 0 else f"T{temperature:g}"
        return {f"eval_acc_{tag}": float(t[0] / max(t[1], 1)), "eval_n": float(t[1])}

    def _loss_from_stats(self, scored: ScoredBatch, mask: Optional[torch.Tensor]) -> dict[str, float]:
        """Loss value (global mean reverse KL over kept tokens), from the scoring pass's exact KLs.

        The gradient pass computes the same quantity at the same weights; taking it from the
        stats keeps the logging path independent of the pipeline schedule's return values.
        """
        sums = torch.zeros(2, dtype=torch.float64)
        if scored.stats is not None and mask is not None:
            sums[0] = scored.stats["reverse_kl"][mask].double().sum()
            sums[1] = mask.sum()
            dist.all_reduce(sums, group=self.ctx.dp_group)
        dist.all_reduce(sums, op=dist.ReduceOp.MAX)  # share the last stage's value with all ranks
        return {"loss": float(sums[0] / sums[1]) if sums[1] > 0 else math.nan}

    def _dump_token_stats(self, step: int, st, valid, sel) -> None:
        """This rank's valid tokens of one step: h, reverse/forward KL, kept mask, quadrant thresholds."""
        from pathlib import Path

        path = Path(self.cfg.train.out_dir) / f"token_stats_step{step:06d}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"norm_entropy": st["norm_entropy"][valid], "reverse_kl": st["reverse_kl"][valid],
                    "forward_kl": st["forward_kl"][valid], "kept": sel.mask[valid],
                    "quadrant": sel.quadrant[valid], "h_threshold": sel.metrics.get("h_threshold"),
                    "kl_threshold": sel.metrics.get("kl_threshold")}, path)

    def _teacher_entropy(self, st, valid) -> dict[str, float]:
        """Mean normalized teacher entropy over the global batch (logged only, DESIGN §1)."""
        te = torch.stack([st["teacher_entropy"][valid].double().sum(), valid.sum().double()])
        dist.all_reduce(te, group=self.ctx.dp_group)
        mean = float(te[0] / te[1]) / math.log(self.s.vocab_size) if te[1] > 0 else math.nan
        return {"mean_teacher_h": mean}
