"""Process groups of a model in a layout of its own, on the same ranks as the student.

megatron-core 0.16 builds a GPTModel on an explicit ``ProcessGroupCollection``, so a teacher with
TP=4 on 4 ranks and a student with TP=2 x DP=2 share the ranks without a second ``parallel_state``.
The ranks are laid out as TP x CP x DP x PP in megatron's order (TP fastest, as
``initialize_model_parallel`` and ``HyperCommGrid(shape, ["tp", "cp", "dp", "pp"])`` do; the grid
itself needs einops, which megatron-core does not install, so the enumeration is written out here
and tested against ``parallel_state``'s groups: tests/unit/test_teacher_groups.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch.distributed as dist

DIMS = ("tp", "cp", "dp", "pp")  # fastest-varying first (megatron's rank order)


@dataclass
class RoleGroups:
    """One role's layout on this rank: sizes, ranks and megatron's group collection."""

    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    pg_collection: Any  # megatron.core.process_groups_config.ProcessGroupCollection

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1


def rank_enum(sizes: dict[str, int], dims: tuple[str, ...]) -> list[list[int]]:
    """The rank lists of the groups spanning ``dims`` (each list ordered with ``dims[0]`` fastest).

    ``sizes``: tp, cp, dp, pp sizes; rank = tp_i + tp * (cp_i + cp * (dp_i + dp * pp_i)).
    """
    shape = [sizes[d] for d in reversed(DIMS)]  # C order: pp slowest, tp fastest
    grid = np.arange(int(np.prod(shape))).reshape(shape)
    names = list(reversed(DIMS))
    inside = [names.index(d) for d in reversed(dims)]  # last axis varies fastest
    outside = [i for i in range(len(names)) if i not in inside]
    return grid.transpose(outside + inside).reshape(-1, int(np.prod([shape[i] for i in inside]))).tolist()


def _group(sizes: dict[str, int], dims: tuple[str, ...]):
    group, _ = dist.new_subgroups_by_enumeration(rank_enum(sizes, dims))
    return group


def role_groups(*, tp: int, pp: int, world_size: int) -> RoleGroups:
    """Collective over the world (every rank, same arguments): build a TP x PP x DP layout's groups.

    DP = world / (TP x PP) (the caller checked divisibility). The collection holds what
    GPTModel, its layers and the non-interleaved pipeline schedule read: tp, pp, cp, dp, dp_cp,
    tp_cp, mp, embd (first + last stage: tied embeddings) and pos_embd (first stage).
    """
    from megatron.core.process_groups_config import ProcessGroupCollection

    sizes = {"tp": tp, "cp": 1, "dp": world_size // (tp * pp), "pp": pp}
    pgc = ProcessGroupCollection()
    pgc.tp = _group(sizes, ("tp",))
    pgc.cp = _group(sizes, ("cp",))
    pgc.dp = _group(sizes, ("dp",))
    pgc.pp = _group(sizes, ("pp",))
    pgc.dp_cp = _group(sizes, ("cp", "dp"))
    pgc.tp_cp = _group(sizes, ("tp", "cp"))
    pgc.mp = _group(sizes, ("tp", "pp"))
    stages = rank_enum(sizes, ("pp",))  # each pipeline's ranks, first stage to last
    pgc.embd, _ = dist.new_subgroups_by_enumeration([sorted({r[0], r[-1]}) for r in stages])
    pgc.pos_embd, _ = dist.new_subgroups_by_enumeration([[r[0]] for r in stages])
    return RoleGroups(tp=tp, pp=pp, dp=sizes["dp"], tp_rank=pgc.tp.rank(), pp_rank=pgc.pp.rank(),
                      dp_rank=pgc.dp.rank(), pg_collection=pgc)
