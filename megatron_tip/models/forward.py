"""Forward helpers around megatron-core's GPTModel and pipeline schedules.

- ``output_positions``: make the output layer compute logits only at chosen (batch, seq)
  positions, so logits memory scales with the number of kept tokens (TIP pass 2) or with the
  batch size (sampling the next token); with ``hidden_only`` it returns the picked hidden states
  instead, for a fused output layer + loss (``ops.vocab_parallel_linear_reverse_kl``).
- ``output_weight``: the output layer's weight shard (the word embedding when tied).
- ``capture_hidden``: keep the final hidden states that enter the output layer (teacher pass 1:
  hidden [S, B, H] is ~V/H times smaller than logits, and logits are recomputed from it).
- ``final_hidden``: a no-grad pass that returns only those final hidden states (no logits).
- ``run_microbatches``: one call for PP=1 (a direct loop with the schedule's per-token-loss
  contract) and PP>1 (megatron's own schedule); the callback runs on the last pipeline stage
  with that micro-batch's model output. A micro-batch with ``cu_seqlens`` (THD layout,
  ``rollout.layout.packed_microbatches``) is run with megatron's ``PackedSeqParams``.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Optional

import torch


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


@contextlib.contextmanager
def output_positions(model: torch.nn.Module, index: Optional[tuple[torch.Tensor, torch.Tensor]], *,
                     hidden_only: bool = False) -> Iterator[None]:
    """While active, GPTModel returns logits [1, n, V/TP] for positions ``(b_idx, s_idx)`` only.

    ``hidden_only=True``: the output layer is skipped and GPTModel returns the final hidden
    states [1, n, H] at those positions (graph attached; the caller applies ``output_weight``).
    ``index=None`` leaves the model unchanged. Empty indices give [1, 0, V/TP] (still a valid
    graph, so every rank takes part in the backward).
    """
    gpt = unwrap(model)
    if index is None or not getattr(gpt, "post_process", True):
        yield
        return
    layer = gpt.output_layer
    original = layer.forward
    b_idx, s_idx = index

    def forward(hidden_states, *args, **kwargs):  # hidden_states: [S, B, H]
        picked = hidden_states[s_idx, b_idx].unsqueeze(1)  # [n, 1, H]
        return (picked, None) if hidden_only else original(picked, *args, **kwargs)

    layer.forward = forward
    try:
        yield
    finally:
        layer.forward = original


@contextlib.contextmanager
def capture_hidden(model: torch.nn.Module, store: list) -> Iterator[None]:
    """Append the (detached) final hidden states [S, B, H] of every forward to ``store``."""
    gpt = unwrap(model)
    if not getattr(gpt, "post_process", True):
        yield
        return
    handle = gpt.output_layer.register_forward_pre_hook(
        lambda mod, args: store.append(args[0].detach()))
    try:
        yield
    finally:
        handle.remove()


def output_weight(model: torch.nn.Module) -> torch.Tensor:
    """The output layer's weight shard [V/TP, H] on the last stage (the word embedding when tied)."""
    gpt = unwrap(model)
    if gpt.share_embeddings_and_output_weights:
        return gpt.shared_embedding_or_output_weight()
    return gpt.output_layer.weight


def output_logits(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Apply ``model``'s output layer to hidden [n, H] -> vocab-sharded logits [n, V/TP]."""
    gpt = unwrap(model)
    weight = output_weight(model) if gpt.share_embeddings_and_output_weights else None
    logits, _ = gpt.output_layer(hidden.unsqueeze(1), weight=weight)
    return logits[:, 0]


def final_hidden(model: torch.nn.Module, mbs: list[dict], *, pg_collection: Any = None,
                 with_graph: bool = False) -> list[torch.Tensor]:
    """Final hidden states [s, b, H] per micro-batch (last stage; [] elsewhere); no logits computed.

    No grad unless ``with_graph`` (PP=1 only): then the forward records autograd in train mode and
    the states keep it (``scoring.one_student_forward``). ``pg_collection``: as in
    :func:`run_microbatches` (a model in a layout of its own).
    """
    if with_graph:
        return _hidden_with_graph(model, mbs)
    hidden: list[torch.Tensor] = []
    device = mbs[0]["input_ids"].device if mbs else torch.device("cpu")
    empty = (torch.zeros(0, dtype=torch.long, device=device), torch.zeros(0, dtype=torch.long, device=device))

    def no_loss(mb, out):
        return out.sum() * 0, torch.zeros((), dtype=torch.int, device=out.device), {}

    with capture_hidden(model, hidden):
        run_microbatches(model, mbs, no_loss, forward_only=True, prepare=lambda mb: output_positions(model, empty),
                         pg_collection=pg_collection)
    return hidden


def _hidden_with_graph(model: torch.nn.Module, mbs: list[dict]) -> list[torch.Tensor]:
    hidden = []
    model.train()  # the mode the gradient pass runs in
    with torch.enable_grad():
        for mb in mbs:
            b, s = mb["input_ids"].shape
            grid = torch.arange(s * b, device=mb["input_ids"].device)
            with output_positions(model, (grid % b, grid // b), hidden_only=True):  # all positions, s-major
                out = model(mb["input_ids"], mb["position_ids"], None, **packed_seq_kwargs(mb))  # [1, s*b, H]
            hidden.append(out[0].reshape(s, b, -1))
    return hidden


def packed_seq_kwargs(mb: dict[str, Any]) -> dict[str, Any]:
    """``packed_seq_params`` for a THD micro-batch (``cu_seqlens`` int32 [n+1], ``max_seqlen``); {} otherwise.

    Attention (Transformer Engine) then stops at each sequence's end and RoPE restarts at 0 per
    sequence; the model sees input_ids [1, T] and returns [T, 1, ...].
    """
    if "cu_seqlens" not in mb:
        return {}
    from megatron.core.packed_seq_params import PackedSeqParams

    cu, m = mb["cu_seqlens"], mb["max_seqlen"]
    return {"packed_seq_params": PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                                 max_seqlen_q=m, max_seqlen_kv=m)}


def run_microbatches(
    model: torch.nn.Module,
    microbatches: list[dict[str, Any]],
    on_output: Callable[[dict[str, Any], torch.Tensor], tuple[torch.Tensor, torch.Tensor, dict]],
    *,
    forward_only: bool,
    prepare: Optional[Callable[[dict[str, Any]], contextlib.AbstractContextManager]] = None,
    pg_collection: Any = None,
) -> list[dict]:
    """Run ``model`` over micro-batches (dicts with input_ids [B,S], position_ids [B,S]).

    ``on_output(mb, output)`` runs on the last PP stage and returns megatron's per-token-loss
    triple (loss_sum, num_tokens, report). ``prepare(mb)`` wraps each micro-batch's forward
    (e.g. ``output_positions``). Returns the reports of the last stage ([] elsewhere).
    Shapes may differ between micro-batches (token-budget layout): with PP>1 the schedule then
    exchanges each activation's shape before it (megatron's ``variable_seq_lengths``).
    ``pg_collection``: the model's own process groups (a model built with them, e.g. a teacher in
    its own layout); the schedule then sends activations over its ``pp`` group. None: megatron's
    global parallel_state.
    """
    if not microbatches:
        return []
    from megatron.core import parallel_state as ps

    pp = pg_collection.pp.size() if pg_collection is not None else ps.get_pipeline_model_parallel_world_size()
    if pp == 1:
        return _run_without_pipeline(model, microbatches, on_output, forward_only=forward_only, prepare=prepare)
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator
    from megatron.core.pipeline_parallel.schedules import forward_backward_pipelining_without_interleaving

    def step(data_iter, m):
        mb = next(data_iter)
        ctx = prepare(mb) if prepare is not None else contextlib.nullcontext()
        with ctx:
            out = m(mb["input_ids"], mb["position_ids"], None, **packed_seq_kwargs(mb))
        return out, lambda output: on_output(mb, output)

    from megatron.core.utils import get_model_config

    b, s = microbatches[0]["input_ids"].shape
    config = get_model_config(model)
    varying = len({tuple(mb["input_ids"].shape) for mb in microbatches}) > 1
    before = config.variable_seq_lengths
    config.variable_seq_lengths = before or varying  # only PP>1 reads it (p2p shapes)
    groups = {}
    if pg_collection is not None:  # the model's own groups, not parallel_state's
        groups = dict(p2p_communicator=P2PCommunicator(pp_group=pg_collection.pp, config=config),
                      pg_collection=pg_collection)
    try:
        # get_forward_backward_func() picks by the global PP size; a model with its own groups
        # runs the non-interleaved schedule with them.
        schedule = forward_backward_pipelining_without_interleaving if groups else get_forward_backward_func()
        return schedule(
            forward_step_func=step, data_iterator=iter(microbatches), model=[model],
            num_microbatches=len(microbatches), seq_length=s, micro_batch_size=b,
            forward_only=forward_only, **groups)
    finally:
        config.variable_seq_lengths = before


def _run_without_pipeline(model, microbatches, on_output, *, forward_only: bool, prepare) -> list[dict]:
    """PP=1: what megatron's ``forward_backward_no_pipelining`` does for a per-token loss, minus its
    per-call overhead (at toy sizes the schedule and its CPU device shim cost more than the model).

    Same contract: every micro-batch's loss sum is backpropagated as is (no division), gradient
    sync is deferred (``no_sync``) until the last micro-batch, and ``finalize_model_grads`` gets the
    summed token count, so gradients are divided by the global kept count exactly as before.
    """
    from megatron.core.utils import get_model_config

    config = get_model_config(model)
    no_sync = config.no_sync_func or contextlib.nullcontext
    device = microbatches[0]["input_ids"].device
    total_tokens = torch.zeros([], dtype=torch.int, device=device)
    reports: list[dict] = []
    last = len(microbatches) - 1
    grad_ctx = contextlib.nullcontext() if not forward_only else torch.no_grad()
    with grad_ctx:
        for i, mb in enumerate(microbatches):
            with no_sync() if i < last else contextlib.nullcontext():
                with prepare(mb) if prepare is not None else contextlib.nullcontext():
                    out = model(mb["input_ids"], mb["position_ids"], None, **packed_seq_kwargs(mb))
                loss, num_tokens, report = on_output(mb, out)
                total_tokens += num_tokens
                reports.append(report)
                if not forward_only:
                    if config.grad_scale_func is not None:
                        loss = config.grad_scale_func(loss)
                    if loss.requires_grad:
                        torch.autograd.backward(loss)
    if not forward_only and config.finalize_model_grads_func is not None:
        config.finalize_model_grads_func([model], total_tokens if config.calculate_per_token_loss else None)
    return reports


def backward_microbatches(model: torch.nn.Module, losses: list[Callable[[], tuple[torch.Tensor, torch.Tensor]]]) -> None:
    """PP=1: backpropagate per-micro-batch losses whose forwards already ran (graphs kept by the caller).

    ``losses[i]()`` returns (loss_sum, num_tokens) of micro-batch i. The contract of
    ``_run_without_pipeline``: each loss sum backpropagated as is, gradient sync deferred (``no_sync``)
    until the last one, ``finalize_model_grads`` given the summed token count.
    """
    from megatron.core.utils import get_model_config

    config = get_model_config(model)
    no_sync = config.no_sync_func or contextlib.nullcontext
    total_tokens = None
    last = len(losses) - 1
    for i, loss_of in enumerate(losses):
        with no_sync() if i < last else contextlib.nullcontext():
            loss, num_tokens = loss_of()
            total_tokens = num_tokens.clone() if total_tokens is None else total_tokens + num_tokens
            if config.grad_scale_func is not None:
                loss = config.grad_scale_func(loss)
            if loss.requires_grad:
                torch.autograd.backward(loss)
    if config.finalize_model_grads_func is not None and losses:
        config.finalize_model_grads_func([model], total_tokens if config.calculate_per_token_loss else None)

