"""compat/rope.py: megatron's unfused RoPE without the empty cat gives bitwise megatron's values and
gradients, and every case it does not cover still runs megatron's own function."""
import pytest
import torch

from megatron_tip.compat.rope import apply_rope_without_empty_cat


def _functions():
    from megatron.core.models.common.embeddings import rope_utils

    apply_rope_without_empty_cat()
    apply_rope_without_empty_cat()  # idempotent: still one wrapper around the original
    patched = rope_utils._apply_rotary_pos_emb_bshd
    return patched, patched.megatron_original


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rot,interleaved,mla,mscale", [
    (64, False, False, 1.0),   # the patched case: RoPE over the whole head
    (64, False, False, 0.7),   # YaRN-style mscale
    (32, False, False, 1.0),   # partial rotary: megatron's own function
    (64, True, False, 1.0),    # interleaved: megatron's own function
    (64, False, True, 1.0),    # multi-latent attention: megatron's own function
])
def test_patched_rope_is_bitwise_megatrons(dtype, rot, interleaved, mla, mscale):
    patched, original = _functions()
    assert patched is not original
    g = torch.Generator().manual_seed(rot + int(interleaved) + 2 * int(mla))
    t = torch.randn(7, 3, 4, 64, generator=g).to(dtype)
    # strided like megatron's q/k (a split of the fused QKV projection)
    t = torch.cat([t, torch.randn(7, 3, 4, 64, generator=g).to(dtype)], dim=-1)[..., :64]
    freqs = torch.randn(7, 1, 1, rot, generator=g)
    outs, grads = [], []
    for fn in (original, patched):
        x = t.detach().clone().requires_grad_(True)
        y = fn(x, freqs, rotary_interleaved=interleaved, multi_latent_attention=mla, mscale=mscale)
        y.backward(torch.linspace(-1, 1, y.numel()).reshape(y.shape).to(dtype))
        outs.append(y.detach())
        grads.append(x.grad)
    assert outs[0].shape == outs[1].shape == t.shape and outs[0].dtype == dtype
    assert torch.equal(outs[0], outs[1]) and torch.equal(grads[0], grads[1])
