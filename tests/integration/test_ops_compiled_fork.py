"""Compiled ops in a rank forked after the parent compiled a kernel (issue #25: such a rank hung).

Inductor compiles CPU kernels on a thread pool that a forked child inherits without its threads;
the child's first C++ compile then waited forever (test_plan_calibration's tp1 case timed out when
its pytest worker had run compiled-op tests first). Both processes get fresh inductor cache dirs
so that each really compiles C++ (a kernel already on disk needs no pool), and two compile
threads, the default on any multi-core machine.
"""
import torch
import torch._inductor.config as inductor_config

from megatron_tip.launch import run_distributed
from megatron_tip.ops import vocab_parallel_token_stats
from tests.helpers.token_stats_cases import make_case, reference


def _stats(shape, width):
    zs, zt, tid, w = make_case(shape, width, width)
    st = vocab_parallel_token_stats(zs, zt, target_ids=tid, impl="compiled")
    ref = reference(zs, zt, width, tid, w)
    for f in ("entropy", "reverse_kl", "forward_kl", "teacher_entropy", "target_logprob"):
        torch.testing.assert_close(getattr(st, f).double(), ref[f], atol=1e-5, rtol=1e-5, msg=f)


def _rank(rank, world, cache_dir):
    import os

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
    _stats((5,), 24)  # a new shape: the compiled function recompiles in this process
    return True


def test_compiled_op_in_a_rank_forked_after_the_parent_compiled(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "parent"))
    with inductor_config.patch(compile_threads=2):
        _stats((3,), 40)  # the parent compiles: inductor's compile thread pool now exists here
        assert run_distributed(_rank, 1, str(tmp_path / "child"), timeout=240, init_dist=False) == [True]
