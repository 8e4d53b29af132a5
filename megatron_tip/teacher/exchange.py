"""Moving rows between the student's data-parallel layout and a teacher's own layout.

The student's DP ranks each hold their rows of the global batch; a teacher in its own layout
(DP_T = world / (TP_T x PP_T)) scores contiguous slices of the *global* batch. ``gather_rows``
gives every rank the global batch (token ids and lengths only: a few bytes per position);
``send_hidden`` moves each row's final hidden states [L, H] from one teacher last-stage rank to
exactly the student last-stage ranks of that row's DP rank (point-to-point, no all-gather of
hidden states). Both are collective over the world and use only the default group.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_tip.rollout.layout import PaddedBatch, from_padded


@dataclass
class RankRoles:
    """Every rank's place in both layouts (one row per global rank), gathered once at build time."""

    student_dp: list[int]
    student_last: list[bool]
    teacher_dp: list[int]
    teacher_tp: list[int]
    teacher_last: list[bool]


def gather_roles(*, student_dp: int, student_last: bool, teacher_dp: int, teacher_tp: int, teacher_last: bool,
                 device: torch.device) -> RankRoles:
    """Collective: this rank's coordinates in both layouts, exchanged with every rank."""
    mine = torch.tensor([student_dp, int(student_last), teacher_dp, teacher_tp, int(teacher_last)], device=device)
    table = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(table, mine)
    cols = torch.stack(table).cpu().tolist()
    return RankRoles(student_dp=[c[0] for c in cols], student_last=[bool(c[1]) for c in cols],
                     teacher_dp=[c[2] for c in cols], teacher_tp=[c[3] for c in cols],
                     teacher_last=[bool(c[4]) for c in cols])


@dataclass
class GlobalRows:
    """The global batch in student DP order: ids/positions [G, S] (S: the longest row), lengths [G] (host)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    lengths: torch.Tensor
    offsets: list[int]  # first global row of each student DP rank (len DP_S + 1)


def gather_rows(batch: PaddedBatch, roles: RankRoles) -> GlobalRows:
    """Collective: every rank gets the global batch's token ids, positions and lengths."""
    device = batch.input_ids.device
    world = dist.get_world_size()
    b, s = batch.input_ids.shape
    shape = torch.tensor([b, s], device=device)
    shapes = [torch.zeros_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape)
    bmax, smax = (int(x) for x in torch.stack(shapes).max(0).values)
    packed = torch.zeros(3, bmax, smax, dtype=torch.long, device=device)  # ids, positions, lengths in [2, :, 0]
    packed[0, :b, :s] = batch.input_ids
    packed[1, :b, :s] = batch.position_ids
    packed[2, :b, 0] = batch.lengths.to(device)
    parts = [torch.zeros_like(packed) for _ in range(world)]
    dist.all_gather(parts, packed)
    ids, pos, lengths, offsets = [], [], [], [0]
    for d in range(max(roles.student_dp) + 1):
        r = roles.student_dp.index(d)  # one rank of DP rank d (its TP/PP ranks hold the same rows)
        n = int(shapes[r][0])
        ids.append(parts[r][0, :n])
        pos.append(parts[r][1, :n])
        lengths.append(parts[r][2, :n, 0])
        offsets.append(offsets[-1] + n)
    lengths_t = torch.cat(lengths).cpu()
    width = max(int(lengths_t.max()), 1) if lengths_t.numel() else 1
    return GlobalRows(torch.cat(ids)[:, :width], torch.cat(pos)[:, :width], lengths_t, offsets)


def teacher_rows(n_rows: int, *, teacher_dp: int, dp_rank: int) -> range:
    """The global rows teacher DP rank ``dp_rank`` scores: a contiguous, near-even slice."""
    base, extra = divmod(n_rows, teacher_dp)
    start = dp_rank * base + min(dp_rank, extra)
    return range(start, start + base + (dp_rank < extra))


def _plan(rows: GlobalRows, roles: RankRoles) -> list[tuple[int, int, int]]:
    """(global row, source rank, destination rank) for every transfer, the same on every rank.

    A row's source is one last-stage rank of the teacher DP rank that scored it (rows spread over
    its TP ranks); its destinations are the last-stage ranks of the student DP rank that owns it.
    """
    world = len(roles.student_dp)
    t_dp = max(roles.teacher_dp) + 1
    n = rows.offsets[-1]
    out = []
    for e in range(t_dp):
        senders = sorted((roles.teacher_tp[r], r) for r in range(world) if roles.teacher_dp[r] == e
                         and roles.teacher_last[r])
        for j, g in enumerate(teacher_rows(n, teacher_dp=t_dp, dp_rank=e)):
            src = senders[j % len(senders)][1]
            d = next(k for k in range(len(rows.offsets) - 1) if rows.offsets[k] <= g < rows.offsets[k + 1])
            for dst in range(world):
                if roles.student_dp[dst] == d and roles.student_last[dst]:
                    out.append((g, src, dst))
    return out


def send_hidden(hidden: dict[int, torch.Tensor], rows: GlobalRows, roles: RankRoles, *, hidden_size: int,
                dtype: torch.dtype, device: torch.device) -> dict[int, torch.Tensor]:
    """Collective: route each global row's hidden states [L_g, H] to the student ranks that own it.

    ``hidden``: the rows this rank sends, by global row (a teacher last stage; else empty).
    Returns this rank's received rows by global row (student last stage; else empty).
    """
    me = dist.get_rank()
    plan = _plan(rows, roles)
    lengths = rows.lengths.tolist()
    out: dict[int, torch.Tensor] = {}
    ops, recvs = [], []
    peers = sorted({(src, dst) for _, src, dst in plan if me in (src, dst)})
    for src, dst in peers:
        gs = [g for g, s, d in plan if (s, d) == (src, dst)]
        if src == dst:
            out.update({g: hidden[g] for g in gs})
        elif src == me:
            ops.append(dist.P2POp(dist.isend, torch.cat([hidden[g] for g in gs]).contiguous(), dst))
        else:
            buf = torch.empty(sum(lengths[g] for g in gs), hidden_size, dtype=dtype, device=device)
            ops.append(dist.P2POp(dist.irecv, buf, src))
            recvs.append((gs, buf))
    if ops:
        for req in dist.batch_isend_irecv(ops):
            req.wait()
    for gs, buf in recvs:
        out.update(zip(gs, buf.split([lengths[g] for g in gs])))
    return out


def to_microbatches(received: dict[int, torch.Tensor], mbs: list[dict], *, first_row: int, width: int,
                    hidden_size: int, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """The student's micro-batch view [s, b, H] of its received rows (zeros at padding).

    The rows are laid out in the student's padded view [n, ``width``, H] (``received[g]`` holds row
    g's real positions only) and picked per micro-batch by ``rollout.layout.from_padded``, so any
    micro-batch layout (fixed rows, token-budget bins, THD rows of several rollouts) is served.
    """
    padded = torch.zeros(len(received), width, hidden_size, dtype=dtype, device=device)
    for r in range(len(received)):
        part = received[first_row + r]
        padded[r, : part.shape[0]] = part
    return [from_padded(mb, padded).transpose(0, 1).contiguous() for mb in mbs]
