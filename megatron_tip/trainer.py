"""On-policy distillation with TIP token selection: one step reads as the algorithm.

    rollout -> score (teacher hidden states + student token stats, no grad) -> select (global batch)
            -> gradient pass on kept positions only -> optimizer step -> weight sync to the engine

Memory: the scoring pass keeps only the teacher's final hidden states (``megatron_tip.scoring``);
the gradient pass applies both output layers only at kept positions, so logits memory scales
with the keep ratio.
"""
from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.distributed as dist

from megatron_tip.distributed import from_last_stage
from megatron_tip.eval.heldout import count_correct, heldout_accuracy
from megatron_tip.loss import kept_linear_reverse_kl_loss, kept_reverse_kl_loss
from megatron_tip.metrics_log import peak_memory_gb
from megatron_tip.models.forward import backward_microbatches, output_positions, output_weight, run_microbatches
from megatron_tip.rollout.base import SamplingParams
from megatron_tip.rollout.layout import PaddedBatch, from_padded, pad_rollouts, processed_tokens, step_microbatches
from megatron_tip.rollout.weight_sync import sync_weights
from megatron_tip.scoring import ScoredBatch, score_batch
from megatron_tip.seeding import HELD_OUT, ROLLOUT, derive_seed
from megatron_tip.sections import TrainConfig  # noqa: F401 (re-export: the section's old import path)
from megatron_tip.selection import SelectionResult, select_tokens

if TYPE_CHECKING:  # annotations only
    from megatron_tip.build import Built
    from megatron_tip.config import RunConfig
    from megatron_tip.distributed import ParallelContext


class Trainer:
    """Drives the OPD loop over the parts of a run (``megatron_tip.build.Built``)."""

    def __init__(self, cfg: RunConfig, ctx: ParallelContext, parts: Built) -> None:
        self.cfg, self.ctx, self.p = cfg, ctx, parts
        self.skipped_steps = 0

    # ---- the step ---------------------------------------------------------------------------------
    def train_step(self, step: int) -> dict[str, float]:
        t0 = time.perf_counter()
        prompts, rollouts = self.rollout(step)
        self.sleep_engine()
        batch = pad_rollouts(rollouts, pad_id=self.p.pad_id, device=self.ctx.device)
        t1 = time.perf_counter()
        scored = self.score(batch)
        t2 = time.perf_counter()
        if not self.all_finite(scored):  # NaN/inf anywhere skips the step on every rank
            return self._skip(step, "non-finite token statistics")
        sel, metrics = self.select(scored, step)
        if metrics.get("n_kept", 0.0) == 0:  # megatron divides by the global kept count
            return self._skip(step, "no token selected")
        t3 = time.perf_counter()
        lr = self.p.optimizer.param_groups[0]["lr"]  # the rate this step's update uses
        self.gradient_pass(scored, sel.mask if sel is not None else None,
                           weights=sel.weights if sel is not None else None)
        ok, grad_norm = self.optimizer_step()
        t4 = time.perf_counter()
        self.sync_weights()
        t5 = time.perf_counter()

        metrics.update(self._rollout_metrics(prompts, rollouts, batch))
        metrics.update(self._loss_from_stats(scored, sel.mask if sel is not None else None,
                                             weights=sel.weights if sel is not None else None))
        n_tokens = float(batch.valid.sum())
        metrics.update({
            "step": step, "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else math.nan,
            "update_ok": float(bool(ok)), "skipped_steps": float(self.skipped_steps),
            "time_rollout_s": t1 - t0, "time_score_s": t2 - t1, "time_select_s": t3 - t2,
            "time_train_s": t4 - t3, "time_sync_s": t5 - t4,
            "rollout_tokens_per_s": n_tokens / max(t1 - t0, 1e-9),
            "score_tokens_per_s": n_tokens / max(t2 - t1, 1e-9),
            "train_tokens_per_s": n_tokens / max(t4 - t3, 1e-9),
            "peak_memory_gb": peak_memory_gb(self.ctx.device),
            # positions each forward computes per real (prompt + response) position: 1 = no padding
            "padding_factor": processed_tokens(scored.microbatches) / float(batch.lengths.sum()),
            "microbatches": float(len(scored.microbatches)),
        })
        return metrics

    # ---- 1. rollouts ------------------------------------------------------------------------------
    def rollout(self, step: int) -> tuple[list, list]:
        """This data-parallel rank's prompts of ``step`` and their sampled rollouts."""
        cfg, ctx = self.cfg, self.ctx
        per_rank = cfg.train.prompts_per_step // ctx.dp
        prompts = self.p.dataset.batch(step, size=cfg.train.prompts_per_step)
        mine = prompts[ctx.dp_rank * per_rank:(ctx.dp_rank + 1) * per_rank]
        params = cfg.rollout.sampling(seed=derive_seed(cfg.train.seed, ROLLOUT, step, ctx.dp_rank),
                                      stop_token_ids=self.p.stop_ids)
        return mine, self.p.engine.generate([p.ids for p in mine], params)

    def sleep_engine(self) -> None:
        """Let the rollout engine free its memory while megatron scores and trains (vLLM sleep mode,
        rollout.vllm_sleep_level; a no-op for the other engines); ``sync_weights`` wakes it."""
        self.p.engine.sleep()

    # ---- 2. teacher + student scoring (no grad) ---------------------------------------------------
    def score(self, batch: PaddedBatch) -> ScoredBatch:
        """Token statistics of every position of ``batch``, on the step's micro-batch layout."""
        tc = self.cfg.train
        rows = min(tc.micro_batch_size, batch.input_ids.shape[0])  # never more rows than rollouts
        mbs = step_microbatches(batch, size=rows, max_tokens=tc.max_tokens_per_microbatch, packing=tc.packing)
        return score_batch(batch, mbs, student=self.p.student, teacher=self.p.teacher, cfg=self.cfg.scoring,
                           vocab_size=self.p.vocab_size, tp_group=self.ctx.tp_group,
                           keep_student_graph=self.one_student_forward)

    @property
    def one_student_forward(self) -> bool:
        """scoring.one_student_forward where it applies: PP=1 and the fused output layer."""
        sc = self.cfg.scoring
        return sc.one_student_forward and sc.fused_output_layer and self.ctx.pp == 1

    def all_finite(self, scored: ScoredBatch) -> bool:
        """Whether every statistic the selection reads is finite (a vote of all ranks)."""
        bad = torch.zeros(1, device=self.ctx.device)
        if scored.stats is not None:
            v = scored.batch.valid
            bad[0] = float(any(not torch.isfinite(t[v]).all() for k, t in scored.stats.items()
                               if k != "target_logprob"))
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return bad.item() == 0

    # ---- 3. selection over the global batch ----------------------------------------------------------
    def select(self, scored: ScoredBatch, step: int) -> tuple[Optional[SelectionResult], dict[str, float]]:
        """Kept-token mask (last pipeline stage; None elsewhere) and selection metrics (every rank)."""
        cfg, ctx = self.cfg, self.ctx
        sel, metrics = None, {}
        if scored.stats is not None:
            st, valid = scored.stats, scored.batch.valid
            sel = select_tokens(cfg.selection, norm_entropy=st["norm_entropy"], reverse_kl=st["reverse_kl"],
                                forward_kl=st["forward_kl"], valid=valid, group=ctx.dp_group, step=step)
            metrics.update(sel.metrics)
            metrics.update(self._teacher_entropy(st, valid))
            if cfg.log.dump_token_stats and step == cfg.train.steps - 1 and ctx.dp_rank == 0 and ctx.tp_rank == 0:
                self._dump_token_stats(step, st, valid, sel)
        return sel, self._from_last_stage(metrics)  # every rank logs the same selection metrics

    # ---- 4. gradient pass on kept positions ----------------------------------------------------------
    def gradient_pass(self, scored: ScoredBatch, mask: Optional[torch.Tensor],
                      weights: Optional[torch.Tensor] = None) -> None:
        """Backward of Σ w·KL(kept) / |kept|_global into the student's gradient buffers (w = 1 without weights)."""
        p, ctx = self.p, self.ctx
        index_of = []
        for mb in scored.microbatches:
            if mask is None:  # non-last PP stage: no output layer here
                index_of.append(None)
                continue
            m = from_padded(mb, mask)  # [b, s]: the kept mask at this micro-batch's positions
            index_of.append(m.nonzero(as_tuple=True))
        position = {id(mb): i for i, mb in enumerate(scored.microbatches)}

        sc = self.cfg.scoring
        fused = sc.fused_output_layer

        def prepare(mb):
            return output_positions(p.student, index_of[position[id(mb)]], hidden_only=fused)

        def on_output(mb, out):  # [1, n, H] (fused) or [1, n, V/TP] logits, at kept positions
            i = position[id(mb)]
            b_idx, s_idx = index_of[i]
            t_hidden = scored.teacher_hidden[i][s_idx, b_idx]  # [n, H]
            w = None if weights is None else from_padded(mb, weights)[b_idx, s_idx]
            kw = dict(tp_group=ctx.tp_group, vocab_size=p.vocab_size, weights=w, impl=sc.ops_impl,
                      chunk_size=sc.fused_chunk_size if fused else sc.stats_chunk_size)
            if fused:
                ws = output_weight(p.student)
                # Float16Module hands back fp32; the round trip to the weight's dtype is exact.
                return kept_linear_reverse_kl_loss(out[0].to(ws.dtype), ws, t_hidden,
                                                   p.teacher.output_weight(), **kw)
            with torch.no_grad():
                t_logits = p.teacher.output_logits(t_hidden)
            return kept_reverse_kl_loss(out[0], t_logits, **kw)

        p.student.train()
        p.student.zero_grad_buffer()
        p.optimizer.zero_grad()
        if scored.student_hidden is not None:  # the scoring forward's graph: no second forward
            hidden = scored.student_hidden
            scored.student_hidden = None  # each graph is freed by its backward

            def loss_of(i, mb):
                b_idx, s_idx = index_of[i]
                loss, n, _ = on_output(mb, hidden[i][s_idx, b_idx].unsqueeze(0))
                hidden[i] = None
                return loss, n

            backward_microbatches(p.student, [lambda i=i, mb=mb: loss_of(i, mb)
                                              for i, mb in enumerate(scored.microbatches)])
            return
        run_microbatches(p.student, scored.microbatches, on_output, forward_only=False, prepare=prepare)

    # ---- 5. optimizer ---------------------------------------------------------------------------------
    def optimizer_step(self) -> tuple[bool, Any]:
        """AdamW step (with clipping) and one LR-schedule step; returns (update ok, grad norm)."""
        ok, grad_norm, _ = self.p.optimizer.step()
        self.p.scheduler.step(increment=1)
        return ok, grad_norm

    # ---- 6. weight sync ------------------------------------------------------------------------------
    def sync_weights(self) -> None:
        """Push the updated student into the rollout engine (no-op for the megatron engine)."""
        sync_weights(self.p.engine, self.p.student, spec=self.p.student_spec, tp_group=self.ctx.tp_group)

    # ---- held-out evaluation --------------------------------------------------------------------------
    def evaluate(self, dataset, *, limit: int, samples: int = 1, temperature: float = 1.0) -> dict[str, float]:
        """Accuracy of the student on up to ``limit`` held-out prompts (graded, DP-sharded)."""
        params = SamplingParams(n=samples, temperature=temperature, top_p=1.0,
                                max_new_tokens=self.cfg.rollout.max_new_tokens,
                                seed=derive_seed(self.cfg.train.seed, HELD_OUT), stop_token_ids=self.p.stop_ids)
        return heldout_accuracy(self.p.engine, dataset.prompts[:limit], params, tokenizer=self.p.tokenizer,
                                ctx=self.ctx)

    # ---- metrics ------------------------------------------------------------------------------------------
    def _rollout_metrics(self, prompts, rollouts, batch) -> dict[str, float]:
        """Mean response length and grader accuracy over the global batch."""
        correct = count_correct(rollouts, [p.answer for p in prompts], tokenizer=self.p.tokenizer)
        t = torch.tensor([float(correct), float(len(rollouts)), float(batch.valid.sum())],
                         dtype=torch.float64, device=self.ctx.device)
        dist.all_reduce(t, group=self.ctx.dp_group)
        return {"rollout_accuracy": float(t[0] / t[1]), "response_len": float(t[2] / t[1])}

    def _from_last_stage(self, metrics: dict[str, float]) -> dict[str, float]:
        """With PP>1 only the last stage scores and selects; its metrics go to every stage."""
        return from_last_stage(self.ctx, metrics)

    def _skip(self, step: int, why: str) -> dict[str, float]:
        """Count a skipped step (every rank reaches this together) and say why once."""
        self.skipped_steps += 1
        self.sync_weights()  # wakes a sleeping engine (the weights did not change)
        if self.ctx.rank == 0:
            print(f"step {step}: skipped ({why}); {self.skipped_steps} skipped so far", flush=True)
        return {"step": step, "skipped": 1.0, "skipped_steps": float(self.skipped_steps)}

    def _loss_from_stats(self, scored: ScoredBatch, mask: Optional[torch.Tensor],
                         weights: Optional[torch.Tensor] = None) -> dict[str, float]:
        """Loss value (Σ w·KL over kept tokens / global kept count), from the scoring pass's exact KLs.

        The gradient pass computes the same quantity at the same weights; taking it from the
        stats keeps the logging path independent of the pipeline schedule's return values.
        """
        sums = torch.zeros(2, dtype=torch.float64, device=self.ctx.device)
        if self.ctx.is_last_stage and mask is not None:
            kl = scored.stats["reverse_kl"] if weights is None else scored.stats["reverse_kl"] * weights
            sums[0] = kl[mask].double().sum()
            sums[1] = mask.sum()
            dist.all_reduce(sums, group=self.ctx.dp_group)
        from_last_stage(self.ctx, sums)
        return {"loss": float(sums[0] / sums[1]) if sums[1] > 0 else math.nan}

    def _dump_token_stats(self, step: int, st, valid, sel) -> None:
        """This rank's valid tokens of one step: h, reverse/forward KL, kept mask, quadrant thresholds."""
        from pathlib import Path

        path = Path(self.cfg.run.out_dir) / f"token_stats_step{step:06d}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"norm_entropy": st["norm_entropy"][valid], "reverse_kl": st["reverse_kl"][valid],
                    "forward_kl": st["forward_kl"][valid], "kept": sel.mask[valid],
                    "quadrant": sel.quadrant[valid], "h_threshold": sel.metrics.get("h_threshold"),
                    "kl_threshold": sel.metrics.get("kl_threshold")}, path)

    def _teacher_entropy(self, st, valid) -> dict[str, float]:
        """Mean normalized teacher entropy over the global batch (logged only: nearly constant, paper appendix; docs/method.md §1)."""
        te = torch.stack([st["teacher_entropy"][valid].double().sum(), valid.sum().double()])
        dist.all_reduce(te, group=self.ctx.dp_group)
        mean = float(te[0] / te[1]) / math.log(self.p.vocab_size) if te[1] > 0 else math.nan
        return {"mean_teacher_h": mean}
