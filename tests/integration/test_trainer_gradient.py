"""The two-pass TIP step computes exactly the paper's loss and gradient.

Reference: the HF `transformers` student and teacher in float64 on the *global* batch, full
logits, reverse KL over the true vocabulary, mean over the kept set (the same mask; weighted by
the same per-token weights under inverse-inclusion weighting), autograd.
The trainer path (scoring pass, kept-position output layer fused into the loss or applied before
it, megatron per-token loss, DDP) must give the same loss and the same gradients at TP=1, TP=2,
PP=2 and DP=2, for a tied and an untied student output layer; and the same again with token-budget
micro-batches (``train.max_tokens_per_microbatch``) on rollouts whose lengths differ 10x, where
micro-batches differ in rows and width (PP: p2p shapes exchanged per micro-batch).
A teacher in its own layout (``teacher.parallel``, 4 ranks: teacher TP=4 under a TP=2 x DP=2 student,
teacher TP=2 x PP=2 under a TP=1 x DP=4 student) must give the same loss and gradients; and with THD
packing (``train.packing=thd``: several rollouts per row, ``PackedSeqParams``), megatron's own THD
path with the local attention kernel applied per ``cu_seqlens`` segment (tests/helpers/thd_attention.py).
"""
import pytest
import torch

from megatron_tip.launch import run_distributed
from tests.helpers.trainer_cases import make_pair, make_student, make_teacher_kv4, overrides

pytestmark = pytest.mark.timeout(300)

GLOBAL_SEQS = 4  # sequences in the global batch (split over DP ranks)
WIDTH = 12  # the padded view's width
# Long-tailed lengths for the token-budget cases: 8 sequences of 5 to 41 tokens (each DP rank gets
# a mix); with max_tokens_per_microbatch=72 (the least the config allows) one rank's micro-batches
# are [1 x 39], [2 x 36] (rows of 36 and 34 positions), [1 x 32], [2 x 7], [2 x 4]: rows and widths differ.
MIXED = [(3, 37), (2, 3), (4, 31), (3, 2), (2, 35), (4, 4), (5, 3), (3, 30)]
MIXED_WIDTH = 41
BUDGET = {"train.max_tokens_per_microbatch": 72}
THD = {**BUDGET, "train.packing": "thd"}


def _sequences(vocab: int, mixed: bool = False) -> list[tuple[list[int], list[int]]]:
    g = torch.Generator().manual_seed(3)
    out = []
    lengths = MIXED if mixed else [(3 + i, 6 - i % 2) for i in range(GLOBAL_SEQS)]
    for n_p, n_r in lengths:
        p = torch.randint(4, vocab, (n_p,), generator=g).tolist()
        r = torch.randint(4, vocab, (n_r,), generator=g).tolist()
        out.append((p, r))
    return out


def _trainer_side(rank, world, tp, root, teacher, student, selection, pp=1):
    import contextlib

    from tests.helpers.thd_attention import thd_on_local_spec

    thd = selection.get("train.packing") == "thd"
    with thd_on_local_spec() if thd else contextlib.nullcontext():
        return _step(tp, root, teacher, student, selection, pp)


def _step(tp, root, teacher, student, selection, pp):
    import torch.distributed as dist

    from megatron_tip.config import load_config
    from megatron_tip.rollout.layout import pad_rollouts
    from megatron_tip.distributed import init_parallel
    from megatron_tip.models.sharding import gather_canonical_state_dict, layer_offset
    from megatron_tip.rollout.base import Rollout
    from megatron_tip.build import build
    from megatron_tip.selection import select_tokens
    from megatron_tip.trainer import Trainer

    mixed = "train.max_tokens_per_microbatch" in selection
    cfg = load_config(None, overrides(root, teacher, student, **selection))
    ctx = init_parallel(tp, pp=pp)
    setup = build(cfg, ctx)
    trainer = Trainer(cfg, ctx, setup)
    seqs = _sequences(setup.vocab_size, mixed)
    per = len(seqs) // ctx.dp
    mine = seqs[ctx.dp_rank * per:(ctx.dp_rank + 1) * per]
    rollouts = [Rollout(prompt_index=i, prompt_ids=p, response_ids=r) for i, (p, r) in enumerate(mine)]
    packed = pad_rollouts(rollouts, pad_id=setup.pad_id, seq_len=MIXED_WIDTH if mixed else WIDTH)
    scored = trainer.score(packed)
    shapes = [tuple(mb["input_ids"].shape) for mb in scored.microbatches]
    assert ("cu_seqlens" in scored.microbatches[0]) == (selection.get("train.packing") == "thd")
    if "cu_seqlens" in scored.microbatches[0]:  # THD: one row per micro-batch, no pad position
        assert all(b == 1 for b, _ in shapes) and sum(s for _, s in shapes) == int(packed.lengths.sum())
        assert any(mb["cu_seqlens"].numel() > 2 for mb in scored.microbatches)  # rollouts share a row
    st = scored.stats  # None on earlier pipeline stages: only the last stage holds logits
    mask = weights = None
    if st is not None:
        sel = select_tokens(cfg.selection, norm_entropy=st["norm_entropy"], reverse_kl=st["reverse_kl"],
                            forward_kl=st["forward_kl"], valid=packed.valid, group=ctx.dp_group, step=0)
        mask, weights = sel.mask, sel.weights
    trainer.gradient_pass(scored, mask, weights=weights)
    loss = trainer._loss_from_stats(scored, mask, weights=weights)["loss"]
    grads = {n: p.main_grad for n, p in setup.student.module.named_parameters()}
    canon = gather_canonical_state_dict(
        setup.student.module, tp_group=ctx.tp_group, vocab_size=setup.student_spec.vocab_size, tensors=grads,
        layer_offset=layer_offset(setup.student_spec.num_layers, pp=pp, pp_rank=ctx.pp_rank))
    layout = (type(setup.teacher).__name__, setup.teacher.layout)
    if st is None:
        return loss, canon, None, setup.vocab_size, None, shapes, layout
    masks = [torch.zeros_like(mask) for _ in range(ctx.dp)]
    dist.all_gather(masks, mask.contiguous(), group=ctx.dp_group)
    w = (weights if weights is not None else mask.float()).contiguous()
    ws = [torch.zeros_like(w) for _ in range(ctx.dp)]
    dist.all_gather(ws, w, group=ctx.dp_group)
    return (loss, canon, (torch.cat(masks), torch.cat(ws)), setup.vocab_size, (st["reverse_kl"], packed.valid),
            shapes, layout)


def _reference(teacher, student, mask, weights, vocab, mixed=False):
    from transformers import AutoModelForCausalLM

    from megatron_tip.models.hf.families import spec_from_hf_config
    from megatron_tip.models.hf.mapping import hf_to_canonical

    s = AutoModelForCausalLM.from_pretrained(student, torch_dtype=torch.float64)
    t = AutoModelForCausalLM.from_pretrained(teacher, torch_dtype=torch.float64)
    seqs = _sequences(vocab, mixed)
    ids = torch.zeros(len(seqs), MIXED_WIDTH if mixed else WIDTH, dtype=torch.long)
    for i, (p, r) in enumerate(seqs):
        ids[i, : len(p) + len(r)] = torch.tensor(p + r)
    ls = s(ids).logits[..., :vocab]
    with torch.no_grad():
        lt = t(ids).logits[..., :vocab]
    lps, lpt = torch.log_softmax(ls, -1), torch.log_softmax(lt, -1)
    rkl = (lps.exp() * (lps - lpt)).sum(-1)
    loss = (weights.double() * rkl)[mask].sum() / mask.sum()  # weights are 1 at kept tokens without weighting
    loss.backward()
    grads = {n: p.grad for n, p in s.named_parameters()}
    return float(loss), hf_to_canonical(grads, spec_from_hf_config(s.config)), rkl.detach()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    return (root,) + make_pair(root) + (make_student(root, tie=False), make_teacher_kv4(root),
                                     make_teacher_kv4(root, tie=True))


@pytest.mark.parametrize("tp,world,selection", [
    (1, 1, {"selection.policy": "topk", "selection.score": "soft_or", "selection.keep_ratio": 0.5}),
    (1, "pp2", {"selection.policy": "topk", "selection.score": "soft_or", "selection.keep_ratio": 0.5}),
    (2, 2, {"selection.policy": "topk", "selection.score": "q3", "selection.keep_ratio": 0.3,
            "scoring.score_chunk_tokens": 5,  # logits materialized 5 rows at a time
            "scoring.fused_output_layer": False}),  # output layers, then the loss on logits
    (1, 2, {"selection.policy": "entropy_sampling", "selection.keep_ratio": 0.5,
            "untied": True}),  # the student's own output layer (not the embedding) in the fused loss
    (1, 2, {"selection.policy": "entropy_sampling", "selection.keep_ratio": 0.5,
            "selection.weighting": "inverse_inclusion"}),  # per-token weights through the loss
    # activation recomputation (issue #13) must not change the gradients
    (2, 2, {"selection.policy": "topk", "selection.score": "soft_or", "selection.keep_ratio": 0.5,
            "student.recompute_granularity": "full", "student.recompute_method": "block",
            "student.recompute_num_layers": 1,
            "scoring.fused_chunk_size": 3}),  # the fused op's logits 3 rows at a time (several chunks)
    (1, "pp2", {"selection.policy": "topk", "selection.score": "soft_or", "selection.keep_ratio": 0.5,
                "student.recompute_granularity": "selective"}),
    # token-budget micro-batches on long-tailed lengths (issue #22): TP=2, PP=2, DP=2, tied and untied
    (2, 2, {"selection.policy": "topk", "selection.score": "soft_or", "selection.keep_ratio": 0.5, **BUDGET}),
    (1, "pp2", {"selection.policy": "topk", "selection.score": "q3", "selection.keep_ratio": 0.3, **BUDGET}),
    (1, 2, {"selection.policy": "entropy_sampling", "selection.keep_ratio": 0.5,
            "selection.weighting": "inverse_inclusion", "untied": True, **BUDGET}),
    (1, "pp2", {"selection.policy": "topk", "selection.score": "soft_or", "selection.keep_ratio": 0.5,
                "scoring.fused_output_layer": False, "untied": True, **BUDGET}),
    # the teacher in its own layout (issue #23), on 4 ranks: TP=4 teacher, TP=2 x DP=2 student
    (2, 4, {"selection.policy": "topk", "selection.score": "soft_or", "selection.keep_ratio": 0.5,
            "teacher.parallel.tensor_parallel": 4, "kv4": True}),
    # TP=2 x PP=2 teacher (megatron's schedule on the teacher's own groups), TP=1 x DP=4 student,
    # the output layers applied before the loss (the teacher's weight re-split to the student's TP);
    # teacher.offload on (a no-op on the CPU: this runs its wiring; tests/gpu/checks.py the moves)
    (1, 4, {"selection.policy": "topk", "selection.score": "q3", "selection.keep_ratio": 0.3,
            "teacher.parallel.tensor_parallel": 2, "teacher.parallel.pipeline_parallel": 2,
            "scoring.fused_output_layer": False, "teacher.offload": True}),
    # a pipelined student (PP=2 x DP=2): only its last stage receives rows; teacher TP=4, PP=1
    (1, "pp2x4", {"selection.policy": "topk", "selection.score": "soft_or", "selection.keep_ratio": 0.5,
                  "teacher.parallel.tensor_parallel": 4, "teacher.parallel.pipeline_parallel": 1, "kv4": True}),
    # token-budget micro-batches in both layouts: the TP=2 x PP=2 teacher's own bins of the global
    # rows differ in shape (p2p shapes exchanged on the teacher's pipeline group)
    (2, 4, {"selection.policy": "topk", "selection.score": "soft_or", "selection.keep_ratio": 0.5,
            "teacher.parallel.tensor_parallel": 2, "teacher.parallel.pipeline_parallel": 2, **BUDGET}),
    # a tied teacher at TP=2 x PP=2: its output weight is the last stage's copy of the embedding
    (1, 4, {"selection.policy": "topk", "selection.score": "soft_or", "selection.keep_ratio": 0.5,
            "teacher.parallel.tensor_parallel": 2, "teacher.parallel.pipeline_parallel": 2, "tied_teacher": True}),
    # THD packing (issue #22): TP=2, PP=2, DP=2, tied and untied
    (2, 2, {"selection.policy": "topk", "selection.score": "soft_or", "selection.keep_ratio": 0.5, **THD}),
    (1, "pp2", {"selection.policy": "topk", "selection.score": "q3", "selection.keep_ratio": 0.3, **THD}),
    (1, 2, {"selection.policy": "entropy_sampling", "selection.keep_ratio": 0.5,
            "selection.weighting": "inverse_inclusion", "untied": True, **THD}),
    # THD student micro-batches fed by a teacher in its own layout (its own bins; rows mapped back
    # through src_rows / src_pos)
    (2, 4, {"selection.policy": "topk", "selection.score": "soft_or", "selection.keep_ratio": 0.5,
            "teacher.parallel.tensor_parallel": 4, "kv4": True, **THD}),
])
def test_kept_token_loss_and_grads_match_hf_float64(pair, tp, world, selection):
    root, teacher, student, untied, teacher_kv4, teacher_tied = pair
    selection = dict(selection)
    if selection.pop("untied", False):
        student = untied
    if selection.pop("kv4", False):
        teacher = teacher_kv4
    if selection.pop("tied_teacher", False):
        teacher = teacher_tied
    pp = 2 if str(world).startswith("pp2") else 1
    world = {"pp2": 2, "pp2x4": 4}.get(world, world)  # "pp2x4": PP=2 on 4 ranks (DP=2)
    results = run_distributed(_trainer_side, world, tp, root, teacher, student, selection, pp)
    # DP rank 0 holds the first rows of the global batch; its last stage is rank (world / PP) x (PP - 1).
    mixed = "train.max_tokens_per_microbatch" in selection
    loss, _, (mask, weights), vocab, (rkl_local, valid_local), shapes, layout = results[(world // pp) * (pp - 1)]
    t_tp = selection.get("teacher.parallel.tensor_parallel", 0)
    t_pp = selection.get("teacher.parallel.pipeline_parallel", 0)
    if t_tp or t_pp:  # the teacher really ran in its own layout
        assert layout == ("OwnLayoutTeacher", (t_tp or tp, t_pp or pp)), layout
    else:
        assert layout == ("SameLayoutTeacher", (tp, pp)), layout
    if mixed:  # the budget layout is in use: micro-batches of different shapes, none over the budget
        assert len(set(shapes)) > 1 and all(b * s <= 72 for b, s in shapes), shapes
    grads = {}
    for r in results:  # pipeline stages hold disjoint layers
        grads.update(r[1])
    assert 0 < mask.sum() < mask.numel()
    if selection.get("selection.weighting") == "inverse_inclusion":
        assert not torch.equal(weights[mask], torch.ones_like(weights[mask]))  # the weights do something
    ref_loss, ref_grads, ref_rkl = _reference(teacher, student, mask, weights, vocab, mixed)
    assert abs(loss - ref_loss) < 1e-6 * max(1.0, ref_loss), (loss, ref_loss)
    for r in results:
        assert abs(r[0] - loss) < 1e-12, "ranks disagree on the loss"
    assert set(grads) == set(ref_grads)
    for name, ref in ref_grads.items():
        torch.testing.assert_close(grads[name].double(), ref, atol=1e-7, rtol=1e-4, msg=name)
    # The scoring pass's per-token reverse KL equals the reference on rank 0's response tokens.
    n0 = rkl_local.shape[0]
    torch.testing.assert_close(rkl_local.double()[valid_local], ref_rkl[:n0][valid_local],
                               atol=1e-6, rtol=1e-5)
