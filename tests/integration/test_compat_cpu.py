"""One test per megatron-core CPU shim (megatron_tip/compat/cpu.py)."""
import pytest
import torch

from megatron_tip.compat.cpu import apply_cpu_shims
from megatron_tip.launch import run_distributed

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU shims are inactive with CUDA")


def _rng_tracker(rank, world):
    from megatron.core import tensor_parallel

    apply_cpu_shims()
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(1)
    tensor_parallel.model_parallel_cuda_manual_seed(123)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    before = torch.get_rng_state()
    with tracker.fork():
        a = torch.rand(4)
    with tracker.fork():
        b = torch.rand(4)  # state advanced inside the fork, so a fresh draw
    assert torch.equal(torch.get_rng_state(), before), "fork leaked into the default generator"
    tensor_parallel.model_parallel_cuda_manual_seed(123)
    with tensor_parallel.get_cuda_rng_tracker().fork():
        a2 = torch.rand(4)
    return a, b, a2


def test_rng_tracker_forks_reproducibly():
    a, b, a2 = run_distributed(_rng_tracker, 1)[0]
    assert torch.equal(a, a2) and not torch.equal(a, b)


def _device_calls(rank, world):
    apply_cpu_shims()
    from megatron.core.utils import GlobalMemoryBuffer

    buf = GlobalMemoryBuffer().get_tensor((3, 2), torch.float32, "x")  # allocates on current_device()
    torch.cuda.synchronize()
    torch.cuda.current_stream().wait_stream(torch.cuda.default_stream())
    with torch.cuda.stream(torch.cuda.Stream()):
        pass
    return buf.device.type, str(torch.cuda.current_device())


def test_cuda_device_calls_land_on_cpu():
    assert run_distributed(_device_calls, 1)[0] == ("cpu", "cpu")


def _literal_cuda(rank, world):
    from megatron_tip.compat.cpu import cuda_to_cpu

    apply_cpu_shims()
    with cuda_to_cpu():
        a = torch.zeros(2, device="cuda")
        b = torch.tensor([1.0], dtype=torch.float, device="cuda")
        c = torch.ones(2).cuda()
        d = torch.ones(2).to("cuda")
        e = torch.empty(1, device=torch.device("cuda", 0))
    return [t.device.type for t in (a, b, c, d, e)]


def test_literal_cuda_device_maps_to_cpu():
    assert run_distributed(_literal_cuda, 1)[0] == ["cpu"] * 5


def _mode_only_inside_megatron_cuda_sites(rank, world):
    apply_cpu_shims()
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import serialization
    from megatron.core.optimizer.grad_scaler import ConstantGradScaler

    outside = torch._C._is_torch_function_mode_enabled()  # the model's own ops pay nothing
    scaler = ConstantGradScaler(2.0)  # __init__: torch.tensor(..., device='cuda')
    reexported = dist_checkpointing.save is serialization.save and hasattr(serialization.save, "__wrapped__")
    return outside, scaler.scale.device.type, reexported, torch._C._is_torch_function_mode_enabled()


def test_device_mode_is_entered_only_by_megatron_functions_with_cuda_literals():
    outside, device, reexported, after = run_distributed(_mode_only_inside_megatron_cuda_sites, 1)[0]
    assert not outside and not after
    assert device == "cpu" and reexported


def _clip(rank, world):
    apply_cpu_shims()
    from megatron.core.optimizer import clip_grads

    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.full((4,), 3.0)
    clip_grads.clip_grad_by_total_norm_fp32([p], max_norm=1.0, total_norm=6.0)
    return p.grad


def test_grad_clipping_scales_cpu_grads():
    g = run_distributed(_clip, 1)[0]
    torch.testing.assert_close(g, torch.full((4,), 3.0 / (6.0 + 1e-6)))


def _causal_mask_outside_the_mode(rank, world):
    apply_cpu_shims()
    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils

    assert not torch._C._is_torch_function_mode_enabled()  # as in every forward (and its recomputation)
    m = utils.get_default_causal_mask(4)
    return m, fused_softmax.get_default_causal_mask is utils.get_default_causal_mask


def test_causal_mask_for_recomputation_is_built_on_cpu():
    mask, same = run_distributed(_causal_mask_outside_the_mode, 1)[0]
    assert same and mask.device.type == "cpu"
    assert torch.equal(mask, torch.triu(torch.ones(4, 4), diagonal=1).bool())


def test_shims_are_idempotent_and_noop_flag():
    # Run in a child so the parent test process stays unpatched.
    assert run_distributed(lambda r, w: (apply_cpu_shims(), apply_cpu_shims()), 1)[0] == (True, True)
