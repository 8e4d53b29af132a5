"""GPU-only checks, one JSON line each, then one summary line (run by tests/gpu/run.sh).

  python tests/gpu/checks.py            # on a CUDA machine
  python tests/gpu/checks.py --dry-run  # on the CPU: tiny shapes, no vLLM / TE (checks the script itself)

(a) ops: vocab-parallel token stats and reverse-KL gradient vs a float64 reference, fp32 and bf16
    inputs, impl eager and compiled (Triton); achieved bandwidth of the stats pass as % of a
    device-to-device copy of the same bytes (issue #17 target for compiled: >= 70), kl fwd+bwd time.
    fused linear: bf16 output layer + reverse KL vs float64 (KL, hidden and weight gradients), and
    its time and peak extra memory vs output layers + reverse KL at N = 2k, 8k, 32k kept tokens.
(b) train: the toy pair, 10 steps, bf16, megatron engine and vLLM engine (sleep mode where the
    config has it): finite losses, peak torch.cuda.max_memory_allocated, mean step time; vLLM with
    CUDA graphs (the default) and eager (rollout_s side by side), and with two rollout.tensor_parallel=1
    engines under a TP=2 student (torchrun, 2 ranks; reported as skipped with fewer than 2 GPUs).
(c) te: Transformer Engine's layer spec builds and its logits match the local spec's (bf16).
(d) distopt: distributed optimizer, 4 steps with a save/resume in the middle = uninterrupted.
(e) teacher: on 2 ranks (NCCL; needs 2 GPUs, else skipped), the toy run with the teacher in its own
    layout (teacher.parallel.tensor_parallel=2 under a DP=2 student) gives the same-layout run's
    losses (bf16 tolerance); on 1 rank, teacher.offload=true gives the same losses bit for bit.
    The dry run does both on gloo CPU ranks (float32; offload is a no-op there).
(f) thd: THD packing (issue #22): several rollouts of different lengths in one row with
    PackedSeqParams/cu_seqlens through Transformer Engine's attention vs the same rollouts unpacked,
    bf16, student and teacher: logits of every sequence equal within bf16 tolerance; then 3 toy
    training steps with train.packing=thd vs train.packing=bins (finite, first-step loss equal
    within 5%). --dry-run: the same script on the CPU with megatron's local kernel applied per
    cu_seqlens segment (tests/helpers/thd_attention.py), fp32, no training runs.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

REPO = Path(__file__).resolve().parents[2]
TOY = REPO / "examples" / "configs" / "tiny_cpu.yaml"
RESULTS: dict[str, dict] = {}
sys.path.insert(0, str(REPO))  # tests.helpers (float64 references) when run as a script


def report(name: str, **values) -> None:
    RESULTS[name] = values
    print(json.dumps({"check": name, **values}), flush=True)


def _timed(fn, *, device: torch.device, repeats: int) -> float:
    fn()  # warm-up (allocator, kernels, compilation)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def _impl_context(impl: str, dry_run: bool):
    """The dry run runs the compiled path's chunk loops with uncompiled kernel bodies (inductor on
    the 2-core CPU box costs ~15 s per kernel shape); on CUDA the kernels are really compiled."""
    if impl == "compiled" and dry_run:
        from tests.helpers.fused_rkl_cases import kernels_uncompiled
        return kernels_uncompiled()
    return contextlib.nullcontext()


def _copy_s(nbytes: int, device: torch.device) -> float:
    """Seconds of a device-to-device copy of ``nbytes`` (buffers freed on return)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return _timed(lambda: dst.copy_(src), device=device, repeats=3)


def _compile_s() -> float:
    from megatron_tip.ops.compiled import COMPILE_LOG
    return round(sum(COMPILE_LOG.values()), 1)


def check_ops(device: torch.device, *, n: int, vocab: int, dry_run: bool) -> None:
    """Stats + reverse-KL gradient vs float64 for impl eager and compiled; stats-pass bandwidth as %
    of a device copy of the same bytes (target for the compiled path on GPU: >= 70)."""
    from megatron_tip.ops import vocab_parallel_reverse_kl, vocab_parallel_token_stats

    g = torch.Generator(device="cpu").manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        zs = (torch.randn(n, vocab, generator=g, device="cpu") * 3).to(device=device, dtype=dtype)
        zt = (zs.float() + torch.randn(n, vocab, generator=g, device="cpu").to(device)).to(dtype)
        rows = slice(0, min(n, 64))  # float64 reference on a slice (memory)
        ls, lt = zs[rows].double().log_softmax(-1), zt[rows].double().log_softmax(-1)
        ref_kl = (ls.exp() * (ls - lt)).sum(-1)
        ref_h = -(ls.exp() * ls).sum(-1) / math.log(vocab)
        zr = zs[rows].double().requires_grad_(True)
        lsr = zr.log_softmax(-1)
        (lsr.exp() * (lsr - lt)).sum().backward()
        read = 2 * zs.numel() * zs.element_size()  # the stats pass reads both logit tensors once
        bw_copy = 2 * read / _copy_s(read, device)  # a copy reads and writes the bytes
        res, ok = {}, True
        for impl in ("eager", "compiled"):
            with _impl_context(impl, dry_run):
                st = vocab_parallel_token_stats(zs, zt, vocab_size=vocab, impl=impl)
                zg = zs[rows].clone().requires_grad_(True)
                vocab_parallel_reverse_kl(zg, zt[rows], vocab_size=vocab, impl=impl).sum().backward()
                t_stats = _timed(lambda: vocab_parallel_token_stats(zs, zt, vocab_size=vocab, impl=impl),
                                 device=device, repeats=3)
                zf = zs.detach().requires_grad_(True)
                t_fb = _timed(lambda: vocab_parallel_reverse_kl(zf, zt, vocab_size=vocab, impl=impl).sum().backward(),
                              device=device, repeats=3)
            err_kl = float((st.reverse_kl[rows].double() - ref_kl).abs().max())
            err_h = float((st.norm_entropy[rows].double() - ref_h).abs().max())
            err_grad = float((zg.grad.double() - zr.grad).abs().max())
            ok = ok and err_kl < (1e-4 if dtype == torch.float32 else 2e-2) and math.isfinite(err_grad)
            res[impl] = dict(max_err_reverse_kl=err_kl, max_err_norm_entropy=err_h, max_err_grad=err_grad,
                             stats_s=round(t_stats, 5), kl_fwd_bwd_s=round(t_fb, 5),
                             stats_GBps=round(read / t_stats / 1e9, 1),
                             pct_of_copy=round(100 * read / t_stats / bw_copy, 1))
        report(f"ops_{str(dtype).removeprefix('torch.')}", tokens=n, vocab=vocab, copy_GBps=round(bw_copy / 1e9, 1),
               **res, stats_speedup_compiled=round(res["eager"]["stats_s"] / res["compiled"]["stats_s"], 2),
               kl_fwd_bwd_speedup_compiled=round(res["eager"]["kl_fwd_bwd_s"] / res["compiled"]["kl_fwd_bwd_s"], 2),
               compiled_meets_70pct_of_copy=res["compiled"]["pct_of_copy"] >= 70, compile_s=_compile_s(), ok=ok)


def _peak_extra(fn, device: torch.device) -> Optional[float]:
    """MiB allocated by one call of ``fn`` beyond what was live before it (CUDA; None on CPU)."""
    if device.type != "cuda":
        fn()
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)


def check_fused_linear(device: torch.device, *, vocab: int, hidden: int, n_check: int, n_perf: list[int],
                       dry_run: bool) -> None:
    """bf16 fused output layer + reverse KL (``vocab_parallel_linear_reverse_kl``, impl compiled):
    KL and the gradients of hidden and weight vs float64 math on the same bf16 inputs (tolerance of
    tests/unit/test_ops_fused_linear_rkl.py: 2% of the largest magnitude + 3% relative); then fwd+bwd
    time and peak extra memory vs the unfused path (bf16 logits h W^T of both models, then
    ``vocab_parallel_reverse_kl``) at each N in ``n_perf`` (target: flat in N, <= 1/4 at N=8k)."""
    from megatron_tip.ops import vocab_parallel_linear_reverse_kl, vocab_parallel_reverse_kl
    from tests.helpers.fused_rkl_cases import reference

    dt = torch.bfloat16
    g = torch.Generator(device="cpu").manual_seed(1)
    scale = 3 / hidden ** 0.5  # logits with std ~3
    ws = (torch.randn(vocab, hidden, generator=g) * scale).to(device=device, dtype=dt)
    wt = (ws.float() + torch.randn(vocab, hidden, generator=g).to(device) * scale).to(dt)
    n_max = max([n_check, *n_perf])
    hs = torch.randn(n_max, hidden, generator=g).to(device=device, dtype=dt)
    ht = torch.randn(n_max, hidden, generator=g).to(device=device, dtype=dt)

    def fused(n):
        h, w = hs[:n].detach().requires_grad_(True), ws.detach().requires_grad_(True)
        vocab_parallel_linear_reverse_kl(h, w, ht[:n], wt, vocab_size=vocab, impl="compiled").sum().backward()
        return h.grad, w.grad

    def unfused(n):
        h, w = hs[:n].detach().requires_grad_(True), ws.detach().requires_grad_(True)
        with torch.no_grad():
            t_logits = ht[:n] @ wt.t()
        vocab_parallel_reverse_kl(h @ w.t(), t_logits, vocab_size=vocab, impl="compiled").sum().backward()
        return h.grad, w.grad

    with _impl_context("compiled", dry_run):
        h, w = hs[:n_check].detach().requires_grad_(True), ws.detach().requires_grad_(True)
        kl = vocab_parallel_linear_reverse_kl(h, w, ht[:n_check], wt, vocab_size=vocab, impl="compiled")
        kl.sum().backward()
        ref_kl, ref_gh, ref_gw = reference(ws, wt, hs[:n_check], ht[:n_check], vocab,
                                           torch.ones(n_check, dtype=torch.float64, device=device))
        errs, ok = {}, True
        for name, got, ref in (("kl", kl, ref_kl), ("grad_hidden", h.grad, ref_gh), ("grad_weight", w.grad, ref_gw)):
            err = (got.detach().double() - ref).abs()
            tol = 2e-2 * float(ref.abs().max()) + 3e-2 * ref.abs()
            errs[f"max_err_{name}"] = float(err.max())
            errs[f"max_abs_{name}"] = float(ref.abs().max())
            ok = ok and bool((err <= tol).all())
        del h, w, kl, ref_gh, ref_gw
        perf = []
        for n in n_perf:
            row = {"tokens": n}
            for name, fn in (("fused", fused), ("unfused", unfused)):
                row[f"{name}_s"] = round(_timed(lambda: fn(n), device=device, repeats=3), 5)
                row[f"{name}_peak_extra_MiB"] = _peak_extra(lambda: fn(n), device)
            row["speedup_fused"] = round(row["unfused_s"] / row["fused_s"], 2)
            if row["fused_peak_extra_MiB"] is not None:
                nh = n * hidden * hs.element_size() / 2**20  # the [N, H] hidden-state gradient
                row["fused_minus_NH_MiB"] = round(row["fused_peak_extra_MiB"] - nh, 1)
                row["memory_ratio_fused_to_unfused"] = round(row["fused_peak_extra_MiB"] / row["unfused_peak_extra_MiB"], 3)
            perf.append(row)
    flat = None
    if perf and perf[0].get("fused_minus_NH_MiB"):
        flat = round(perf[-1]["fused_minus_NH_MiB"] / perf[0]["fused_minus_NH_MiB"], 2)
    report("fused_linear_bfloat16", vocab=vocab, hidden=hidden, check_tokens=n_check, **errs, perf=perf,
           memory_flatness_last_over_first=flat, compile_s=_compile_s(), ok=ok)


def _train(out: Path, *overrides: str, timeout: int, ranks: int = 1) -> tuple[int, list[dict], str]:
    launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] if ranks > 1 else []
    cmd = [sys.executable, *launch, "-m", "megatron_tip.train", "--config", str(TOY), f"run.out_dir={out}",
           "eval.prompts=", "log.tensorboard=false", *overrides]
    # in-process checks (init_parallel) leave MASTER_PORT set to a port this process holds: each run picks its own
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)
    metrics = out / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    return res.returncode, rows, res.stderr[-1500:]


def check_train(engine: str, *, steps: int, dtype: str, extra: list[str], timeout: int, name: str = "",
                ranks: int = 1) -> None:
    """``steps`` toy training steps with ``engine`` on ``ranks`` GPUs (torchrun when > 1)."""
    name = name or f"train_{engine}"
    if ranks > 1 and ranks > torch.cuda.device_count():
        report(name, ok=None, note=f"needs {ranks} GPUs, {torch.cuda.device_count()} present")
        return
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        code, rows, err = _train(Path(tmp) / "run", f"train.steps={steps}", f"rollout.engine={engine}",
                                 f"student.dtype={dtype}", f"teacher.dtype={dtype}", "optim.warmup_steps=1",
                                 *extra, timeout=timeout, ranks=ranks)
        wall = time.perf_counter() - t0
    losses = [r.get("loss") for r in rows]
    step_s = [sum(r.get(k, 0.0) for k in r if k.startswith("time_")) for r in rows[1:]]
    report(name, exit_code=code, rollout_s=[round(r.get("time_rollout_s", 0.0), 3) for r in rows], steps=len(rows), losses=[round(x, 5) if x is not None else None
                                                                     for x in losses],
           peak_memory_gb=max((r.get("peak_memory_gb", 0.0) for r in rows), default=None),
           mean_step_s=round(sum(step_s) / len(step_s), 3) if step_s else None, wall_s=round(wall, 1),
           ok=code == 0 and len(rows) == steps and all(x is not None and math.isfinite(x) for x in losses),
           **({"stderr": err} if code else {}))


def check_te(device: torch.device) -> None:
    from megatron_tip.checkpoint import read_spec
    from megatron_tip.distributed import destroy_parallel, init_parallel
    from megatron_tip.models.builder import build_gpt_model, te_available
    from megatron_tip.models.hf.weights import load_hf_weights

    if not te_available():
        report("te", ok=None, note="transformer-engine not importable (pip install -e .[te])")
        return
    student = REPO / "examples" / "toy" / "models" / "student"
    spec = read_spec(student)
    init_parallel(1)
    ids = torch.randint(0, spec.vocab_size, (2, 32), device=device)
    pos = torch.arange(32, device=device)[None].expand(2, -1)
    logits = {}
    for impl in ("local", "transformer_engine"):
        model = build_gpt_model(spec, params_dtype=torch.bfloat16, transformer_impl=impl)
        load_hf_weights(model, str(student), spec=spec)
        with torch.no_grad():
            logits[impl] = model(ids, pos, None).float()
    destroy_parallel()
    diff = float((logits["local"] - logits["transformer_engine"]).abs().max())
    scale = float(logits["local"].abs().max())
    report("te", max_abs_logit_diff=diff, max_abs_logit=scale, ok=diff <= 0.05 * max(scale, 1.0))


def check_thd(device: torch.device, *, dry_run: bool, timeout: int) -> None:
    from megatron_tip.checkpoint import read_spec
    from megatron_tip.distributed import destroy_parallel, init_parallel
    from megatron_tip.models.builder import build_gpt_model, te_available
    from megatron_tip.models.forward import packed_seq_kwargs
    from megatron_tip.models.hf.weights import load_hf_weights
    from megatron_tip.rollout.base import Rollout
    from megatron_tip.rollout.layout import from_padded, packed_microbatches, pad_rollouts
    from tests.helpers.thd_attention import thd_on_local_spec

    if not dry_run and not te_available():
        report("thd", ok=None, note="transformer-engine not importable (pip install -e .[te])")
        return
    impl, dtype = ("local", torch.float32) if dry_run else ("transformer_engine", torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    lengths = [61, 7, 33, 2, 48, 15]  # prompt + response tokens; > 30x apart
    res, ok = {}, True
    with thd_on_local_spec() if dry_run else contextlib.nullcontext():
        init_parallel(1)
        for role in ("student", "teacher"):
            path = REPO / "examples" / "toy" / "models" / role
            spec = read_spec(path)
            rollouts = [Rollout(prompt_index=i, prompt_ids=torch.randint(4, spec.vocab_size, (1,), generator=g).tolist(),
                                response_ids=torch.randint(4, spec.vocab_size, (n - 1,), generator=g).tolist())
                        for i, n in enumerate(lengths)]
            batch = pad_rollouts(rollouts, pad_id=0, device=device)
            (mb,) = packed_microbatches(batch, max_tokens=sum(lengths))  # all rollouts in one row
            model = build_gpt_model(spec, params_dtype=dtype, transformer_impl=impl).to(device)
            load_hf_weights(model, str(path), spec=spec)
            model.eval()
            with torch.no_grad():
                unpacked = model(batch.input_ids, batch.position_ids, None).float()  # [B, S, V], causal
                packed = model(mb["input_ids"], mb["position_ids"], None, **packed_seq_kwargs(mb)).float()  # [1, T, V]
            rows, pos = mb["src_rows"][0], mb["src_pos"][0]
            ref = unpacked[rows, pos]  # [T, V]: each packed position's logits in its own sequence
            err = (packed[0] - ref).abs().amax(-1)  # [T]
            per_seq = [round(float(err[rows == r].max()), 4) for r in range(len(lengths))]
            scale = float(ref.abs().max())
            tol = (1e-4 if dry_run else 0.05) * max(scale, 1.0)
            assert torch.equal(from_padded(mb, batch.input_ids), mb["input_ids"])
            res[role] = {"max_abs_logit_diff_per_sequence": per_seq, "max_abs_logit": round(scale, 3), "tol": tol}
            ok = ok and max(per_seq) <= tol
            del model
        destroy_parallel()
    if not dry_run:  # the trainer end to end on TE: packed vs length-sorted bins
        losses = {}
        for packing in ("thd", "bins"):
            with tempfile.TemporaryDirectory() as tmp:
                code, rows_, err = _train(Path(tmp) / "run", "train.steps=3", f"train.packing={packing}",
                                          "train.max_tokens_per_microbatch=1280", "student.dtype=bfloat16",
                                          "teacher.dtype=bfloat16", "optim.warmup_steps=1", timeout=timeout)
            losses[packing] = [r.get("loss") for r in rows_]
            res[f"train_{packing}"] = dict(exit_code=code, losses=losses[packing],
                                           padding_factor=[r.get("padding_factor") for r in rows_],
                                           **({"stderr": err} if code else {}))
            ok = ok and code == 0 and len(rows_) == 3 and all(x is not None and math.isfinite(x)
                                                            for x in losses[packing])
        if ok:
            a, b = losses["thd"][0], losses["bins"][0]
            ok = abs(a - b) <= 0.05 * abs(b)
    report("thd", lengths=lengths, dtype=str(dtype).removeprefix("torch."), impl=impl, **res, ok=ok)


def check_distopt(*, timeout: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        common = ["train.steps=4", "optim.distributed_optimizer=true", "student.dtype=bfloat16",
                  "teacher.dtype=bfloat16", "optim.warmup_steps=1"]
        _, full, _ = _train(Path(tmp) / "full", *common, timeout=timeout)
        _train(Path(tmp) / "cut", *common, "run.exit_interval=2", timeout=timeout)
        code, cut, err = _train(Path(tmp) / "cut", *common, "run.resume=auto", timeout=timeout)
    a, b = [r.get("loss") for r in full], [r.get("loss") for r in cut]
    report("distopt_resume", losses_full=a, losses_resumed=b, ok=code == 0 and len(a) == 4 and a == b,
           **({"stderr": err} if code else {}))


def check_teacher(*, cuda: bool, steps: int, dtype: str, timeout: int) -> None:
    """Own-layout teacher (2 ranks) vs the same layout, and teacher.offload vs none (1 rank)."""
    common = [f"train.steps={steps}", "optim.warmup_steps=1", f"student.dtype={dtype}", f"teacher.dtype={dtype}",
              "run.save_every=0"]
    rtol = 2e-2 if dtype == "bfloat16" else 1e-4
    with tempfile.TemporaryDirectory() as tmp:
        if not cuda or torch.cuda.device_count() >= 2:
            _, same, _ = _train(Path(tmp) / "same", *common, timeout=timeout, ranks=2)
            code, own, err = _train(Path(tmp) / "own", *common, "teacher.parallel.tensor_parallel=2",
                                    timeout=timeout, ranks=2)
            a, b = [r.get("loss") for r in same], [r.get("loss") for r in own]
            close = len(a) == len(b) == steps and all(x is not None and y is not None and
                                                      abs(x - y) <= rtol * max(abs(x), 1e-6) for x, y in zip(a, b))
            report("teacher_own_layout", losses_same_layout=a, losses_own_layout=b, rtol=rtol,
                   ok=code == 0 and close, **({"stderr": err} if code else {}))
        else:
            report("teacher_own_layout", ok=None, note="needs 2 GPUs (NCCL allows one rank per device)")
        _, plain, _ = _train(Path(tmp) / "plain", *common, timeout=timeout)
        code, off, err = _train(Path(tmp) / "offload", *common, "teacher.offload=true", timeout=timeout)
    a, b = [r.get("loss") for r in plain], [r.get("loss") for r in off]
    report("teacher_offload", losses=a, losses_offload=b,
           peak_memory_gb=[max((r.get("peak_memory_gb", 0.0) for r in rows), default=None) for rows in (plain, off)],
           ok=code == 0 and len(a) == steps and a == b, **({"stderr": err} if code else {}))


def check_kv_decoder(device: torch.device, *, dtype: torch.dtype, repeats: int) -> None:
    """The megatron engine's lean decode forward vs megatron-core's StaticInferenceContext on the toy
    student (local spec): logits equal (bitwise on CPU; reported on CUDA) and ms per decode forward."""
    from megatron_tip.checkpoint import read_spec
    from megatron_tip.distributed import destroy_parallel, init_parallel
    from megatron_tip.models.builder import build_gpt_model
    from megatron_tip.models.hf.weights import load_hf_weights
    from megatron_tip.testing.decode import decode_logits

    student = REPO / "examples" / "toy" / "models" / "student"
    spec = read_spec(student)
    init_parallel(1)
    model = build_gpt_model(spec, params_dtype=dtype, transformer_impl="local").eval()
    load_hf_weights(model, str(student), spec=spec)
    prompt, total = 16, 48
    ids = torch.randint(0, spec.vocab_size, (64, total), device=device)
    ref, got = (decode_logits(model, ids, prompt=prompt, lean=lean) for lean in (False, True))
    bitwise = all(torch.equal(x, y) for x, y in zip(ref, got))
    diff = max(float((x - y).abs().max()) for x, y in zip(ref, got))
    ms = {name: 1e3 * _timed(lambda lean=lean: decode_logits(model, ids, prompt=prompt, lean=lean), device=device,
                             repeats=repeats) / (total - prompt + 1)
          for name, lean in (("megatron", False), ("kv_decoder", True))}
    destroy_parallel()
    report("kv_decoder", bitwise=bitwise, max_abs_logit_diff=diff, ms_per_forward_megatron=ms["megatron"],
           ms_per_forward_kv_decoder=ms["kv_decoder"], ok=bitwise or (device.type == "cuda" and diff <= 1e-2))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, no vLLM/TE/distributed optimizer")
    ap.add_argument("--skip-vllm", action="store_true")
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        print("no CUDA device: use --dry-run on a CPU machine", file=sys.stderr)
        return 2
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    t0 = time.perf_counter()
    check_ops(device, n=4096 if cuda else 64, vocab=151_936 if cuda else 4096, dry_run=not cuda)
    if cuda:
        check_fused_linear(device, vocab=151_936, hidden=1024, n_check=256, n_perf=[2048, 8192, 32768], dry_run=False)
    else:
        check_fused_linear(device, vocab=1000, hidden=32, n_check=24, n_perf=[32, 128], dry_run=True)
    steps = 10 if cuda else 2
    dtype = "bfloat16" if cuda else "float32"
    check_kv_decoder(device, dtype=torch.bfloat16 if cuda else torch.float32, repeats=5 if cuda else 1)
    check_train("megatron", steps=steps, dtype=dtype, extra=[], timeout=300)
    if cuda and not args.skip_vllm:
        vllm_extra = ["rollout.vllm_gpu_memory_utilization=0.3", *json.loads(os.environ.get("VLLM_EXTRA", "[]"))]
        # CUDA graphs (rollout.vllm_enforce_eager auto = false on CUDA), then eager: compare rollout_s
        check_train("vllm", steps=steps, dtype=dtype, extra=vllm_extra, timeout=400)
        check_train("vllm", steps=steps, dtype=dtype, extra=[*vllm_extra, "rollout.vllm_enforce_eager=true"],
                    timeout=400, name="train_vllm_eager")
        # rollout engines smaller than the student's TP: two TP=1 engines under a TP=2 student
        check_train("vllm", steps=steps, dtype=dtype, extra=[*vllm_extra, "parallel.tensor_parallel=2",
                                                             "rollout.tensor_parallel=1"],
                    timeout=400, name="train_vllm_rollout_tp1_under_tp2", ranks=2)
    if cuda:
        check_te(device)
        check_distopt(timeout=300)
    check_teacher(cuda=cuda, steps=2, dtype=dtype, timeout=240)
    check_thd(device, dry_run=not cuda, timeout=200)
    failed = [k for k, v in RESULTS.items() if v.get("ok") is False]
    summary = {k: v.get("ok") for k, v in RESULTS.items()}
    print(f"SUMMARY {'PASS' if not failed else 'FAIL'} device={torch.cuda.get_device_name(0) if cuda else 'cpu'} "
          f"checks={json.dumps(summary)} seconds={time.perf_counter() - t0:.0f}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
