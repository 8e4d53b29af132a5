"""A lean static-KV-cache forward of a megatron-core GPTModel for sampling (PP=1), the same numbers.

Why: at the toy's size about half of a decode step is overhead inside megatron-core (autograd
Function dispatch of every TP linear under no_grad, RNG-tracker forks around dropout, and RoPE
re-applied to the whole cached prefix at every step: the static inference context caches keys
before rotation). This forward reads the model's own parameters and calls the same tensor ops in
the same order and shapes as megatron-core 0.16's local-spec path (``torch.matmul(x, W.t())``,
the model's own norm and core-attention modules), but caches keys after rotation and computes
cos/sin once; a one-position decode step runs megatron's ``DotProductAttention`` ops directly
(``_decode_attention``) and finished rows can leave the batch (``keep``). Logits are bitwise
those of ``GPTModel(..., inference_context=StaticInferenceContext)`` (tests/integration/
test_kv_decoder.py, which also catches a megatron-core upgrade that changes those ops), so
sampled tokens do not change. Checked on CPU only; it has not run on a GPU.

``unsupported(model)`` names the first feature outside that path (MoE, MLA, TE modules, sequence
parallel, fused RoPE, ...); the engine then falls back to megatron-core's own inference path.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_tip.models.forward import unwrap


def _layer_problem(layer) -> str | None:
    from megatron.core.tensor_parallel.layers import (
        ColumnParallelLinear,
        RowParallelLinear,
    )
    from megatron.core.transformer.attention import SelfAttention
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.mlp import MLP

    att, mlp = layer.self_attention, layer.mlp
    if not isinstance(att, SelfAttention) or not isinstance(att.core_attention, DotProductAttention):
        return "attention is not megatron's local SelfAttention/DotProductAttention"
    if not isinstance(mlp, MLP):
        return "the MLP is not a dense megatron MLP (MoE?)"
    # _linear's two cases: column-parallel input layers (output stays sharded), row-parallel output layers
    if not all(isinstance(m, ColumnParallelLinear) and not m.gather_output for m in (att.linear_qkv, mlp.linear_fc1)):
        return "QKV/fc1 is not megatron's local ColumnParallelLinear with a sharded output"
    if not all(isinstance(m, RowParallelLinear) and m.input_is_parallel for m in (att.linear_proj, mlp.linear_fc2)):
        return "proj/fc2 is not megatron's local RowParallelLinear on a sharded input"
    if att.linear_qkv.skip_bias_add:
        return "skip_bias_add on the QKV layer"
    return None


def unsupported(model: torch.nn.Module) -> str | None:
    """Why ``KVDecoder`` cannot run ``model`` (None: it can)."""
    gpt = unwrap(model)
    c = gpt.config
    checks = [
        (not (gpt.pre_process and gpt.post_process), "pipeline parallelism"),
        (gpt.position_embedding_type != "rope", f"position embedding {gpt.position_embedding_type!r}"),
        (c.multi_latent_attention, "multi-latent attention"),
        (c.sequence_parallel, "sequence parallelism"),
        (c.apply_rope_fusion or c.rotary_interleaved, "fused or interleaved RoPE"),
        (c.flash_decode, "flash decode"),
        (c.fp32_residual_connection or c.apply_residual_connection_post_layernorm, "residual variant"),
        (bool(getattr(c, "attention_output_gate", False)), "gated attention output"),
        (bool(getattr(c, "no_rope_freq", None)), "per-layer no-RoPE"),
        (getattr(c, "window_size", None) is not None, "sliding-window attention"),
        (getattr(c, "softmax_type", "vanilla") != "vanilla", "softmax offset"),
        (getattr(c, "activation_func_clamp_value", None) is not None, "clamped GLU"),
        (c.bias_activation_fusion or getattr(c, "use_te_activation_func", False), "fused bias-activation"),
        (c.num_query_groups < c.tensor_model_parallel_size, "fewer KV heads than TP ranks"),
        (getattr(gpt, "mtp_process", False), "multi-token prediction"),
        (c.cuda_graph_impl != "none" if hasattr(c, "cuda_graph_impl") else False, "CUDA graphs"),
    ]
    for bad, what in checks:
        if bad:
            return what
    for layer in gpt.decoder.layers:
        if (why := _layer_problem(layer)) is not None:
            return why
    return None


def _linear(module, x: torch.Tensor, *, row: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Column- (``row=False``) or RowParallelLinear (``row=True``, all-reduced over its TP group)
    forward at inference, megatron's ops: (output, the bias megatron leaves to the caller)."""
    out = torch.matmul(x, module.weight.t())
    if row and module.tp_group is not None and module.tp_group.size() > 1:
        dist.all_reduce(out, group=module.tp_group)
    if module.bias is not None and not module.skip_bias_add:  # a row-parallel bias is added after the reduction
        out = out + module.bias
    return out, (module.bias if module.skip_bias_add else None)


def _bias_add_residual(x: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor) -> torch.Tensor:
    """megatron's inference bias-dropout-add (in place, dropout off): x (+ bias) + residual."""
    residual = residual if residual.dtype == x.dtype else residual.to(x.dtype)
    if bias is not None:
        x.add_(bias)
    return x.add_(residual)


def _rope(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """megatron's ``_apply_rotary_pos_emb_bshd`` (non-interleaved) with cos/sin [s, 1, 1, rot]."""
    rot = cos.shape[-1]
    t, t_pass = t[..., :rot], t[..., rot:]
    x1, x2 = torch.chunk(t, 2, dim=-1)
    t = (t * cos) + (torch.cat((-x2, x1), dim=-1) * sin)
    # megatron always concatenates t_pass; when it is empty that is only a copy of the same values
    return torch.cat((t, t_pass), dim=-1) if t_pass.shape[-1] else t


def _decode_attention(core, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """megatron's ``DotProductAttention.forward`` for one query position in eval mode, its ops and
    shapes without its per-call module work: q [1, B, np, hn], keys/values [sk, B, ng, hn] ->
    context [1, B, np * hn]. With one query position megatron never masks and never takes the
    fused softmax kernel (it needs sq % 4 == 0), and eval-mode dropout is the identity."""
    rep = core.num_attention_heads_per_partition // core.num_query_groups_per_partition
    if rep > 1:
        keys, values = keys.repeat_interleave(rep, dim=2), values.repeat_interleave(rep, dim=2)
    b, n, sk = q.size(1), q.size(2), keys.size(0)
    scores = torch.baddbmm(torch.empty((b * n, 1, sk), dtype=q.dtype, device=q.device),  # beta=0: never read
                           q.reshape(1, b * n, -1).transpose(0, 1), keys.view(sk, b * n, -1).transpose(0, 1).transpose(1, 2),
                           beta=0.0, alpha=core.softmax_scale).view(b, n, 1, sk)
    sm = core.scale_mask_softmax  # its torch path: fp32 softmax of (scaled) scores, cast back
    if sm.input_in_float16 and sm.softmax_in_fp32:
        scores = scores.float()
    if sm.scale is not None:
        scores = scores * sm.scale
    probs = torch.softmax(scores, dim=-1)
    if sm.input_in_float16 and sm.softmax_in_fp32:
        probs = probs.half() if sm.input_in_fp16 else probs.bfloat16()
    ctx = torch.bmm(probs.view(b * n, 1, -1), values.view(sk, b * n, -1).transpose(0, 1))
    return ctx.view(b, n, 1, -1).permute(2, 0, 1, 3).contiguous().view(1, b, -1)


# Fewest rows ``KVDecoder.keep`` shrinks a batch to: BLAS kernels may take another path for tiny
# matrices (on this machine's MKL a row's matmul result is bitwise the same for >= 4 rows).
MIN_ROWS = 8


class KVDecoder:
    """Prefill + one-position-at-a-time forward with a per-layer [T, B, groups, head] cache.

    ``step(ids)`` with ids [B, s] (s new positions, the same for every row) returns the fp32 logits
    [B, V/TP] at the last new position; positions continue from the previous call.
    """

    def __init__(self, model: torch.nn.Module, *, batch: int, max_len: int) -> None:
        gpt = unwrap(model)
        self.gpt, self.max_len, self.offset = gpt, max_len, 0
        dtype = gpt.embedding.word_embeddings.weight.dtype
        freqs = gpt.rotary_pos_emb(max_len)  # [T, 1, 1, rot]: what megatron computes each forward
        # megatron: (cos(freqs) * mscale).to(dtype); mscale is 1.0 outside YaRN (refused), an exact no-op
        self.cos, self.sin = torch.cos(freqs).to(dtype), torch.sin(freqs).to(dtype)
        att = gpt.decoder.layers[0].self_attention
        self.groups = att.num_query_groups_per_partition
        self.per_group = att.num_attention_heads_per_partition // self.groups
        self.head = att.hidden_size_per_attention_head
        shape = (max_len, batch, self.groups, self.head)
        dev = self.cos.device
        self.cache = [(torch.empty(shape, dtype=dtype, device=dev), torch.empty(shape, dtype=dtype, device=dev))
                      for _ in gpt.decoder.layers]
        self.share = gpt.share_embeddings_and_output_weights

    def keep(self, rows: torch.Tensor) -> None:
        """Shrink the batch to ``rows`` [n] (positions in the current batch, in the new order): later
        ``step`` calls take ids [n, s]. Only the filled prefix of each cache is copied.

        Every op of the forward treats batch rows independently (norms, attention per row and
        head, matmuls row by row), so the kept rows' logits stay those of the full batch; checked
        bitwise for batches of at least ``MIN_ROWS`` rows (tests/integration/test_kv_decoder.py).
        """
        def sub(c: torch.Tensor) -> torch.Tensor:
            out = torch.empty((c.shape[0], rows.numel(), *c.shape[2:]), dtype=c.dtype, device=c.device)
            torch.index_select(c[:self.offset], 1, rows, out=out[:self.offset])  # ~5x an indexed copy
            return out

        self.cache = [(sub(k), sub(v)) for k, v in self.cache]

    def _attention(self, i: int, layer, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        att = layer.self_attention
        qkv, _ = _linear(att.linear_qkv, h, row=False)  # [s, B, groups * (per_group + 2) * head]
        qkv = qkv.view(*qkv.shape[:-1], self.groups, (self.per_group + 2) * self.head)
        q, k, v = torch.split(qkv, [self.per_group * self.head, self.head, self.head], dim=3)
        q = q.reshape(q.size(0), q.size(1), -1, self.head)
        if att.q_layernorm is not None:
            q = att.q_layernorm(q)
        if att.k_layernorm is not None:
            k = att.k_layernorm(k)
        s0, s1 = self.offset, self.offset + h.shape[0]
        keys, values = self.cache[i]
        keys[s0:s1] = _rope(k, self.cos[s0:s1], self.sin[s0:s1])  # cached after rotation (elementwise: same values)
        values[s0:s1] = v
        q = _rope(q, self.cos[s0:s1], self.sin[s0:s1])
        core = att.core_attention
        if h.shape[0] == 1 and not core.training:
            ctx = _decode_attention(core, q, keys[:s1], values[:s1])
        else:  # the model's own core attention: causal mask at prefill (offset 0, s > 1)
            ctx = core(q, keys[:s1], values[:s1], None)
        return _linear(att.linear_proj, ctx, row=True)

    @torch.no_grad()
    def step(self, ids: torch.Tensor) -> torch.Tensor:
        gpt = self.gpt
        s = ids.shape[1]
        if self.offset + s > self.max_len:
            raise ValueError(f"KVDecoder: {self.offset + s} positions exceed max_len={self.max_len}")
        pos = torch.arange(self.offset, self.offset + s, device=ids.device).unsqueeze(0).expand(ids.shape[0], -1)
        x = gpt.embedding(input_ids=ids, position_ids=pos)  # [s, B, H]
        for i, layer in enumerate(gpt.decoder.layers):
            out, bias = self._attention(i, layer, layer.input_layernorm(x))
            x = _bias_add_residual(out, bias, x)
            mlp = layer.mlp
            y, bias = _linear(mlp.linear_fc1, layer.pre_mlp_layernorm(x), row=False)
            if bias is not None:  # megatron's unfused activation path adds it first
                y = y + bias
            if mlp.config.gated_linear_unit:
                a, b = torch.chunk(y, 2, dim=-1)
                y = mlp.config.activation_func(a) * (b + mlp.config.glu_linear_offset)
            else:
                y = mlp.activation_func(y)
            out, bias = _linear(mlp.linear_fc2, y, row=True)
            x = _bias_add_residual(out, bias, x)
        x = gpt.decoder.final_layernorm(x)
        self.offset += s
        weight = gpt.shared_embedding_or_output_weight() if self.share else gpt.output_layer.weight
        logits = torch.matmul(x, weight.t())  # [s, B, V/TP], the whole block as megatron computes it
        if gpt.output_layer.bias is not None:
            logits = logits + gpt.output_layer.bias
        return logits[-1].float()
