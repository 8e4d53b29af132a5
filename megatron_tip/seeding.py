"""The one way seeds are derived: ``derive_seed(base, *parts)``.

Every random stream of a run (prompt order per epoch, rollout sampling per step / rank / row,
held-out sampling, selection's per-rollout draws) gets its seed from the run's seed and the
stream's coordinates through this splitmix64 chain, so nearby coordinates (step s and s+1,
row i and i+1) give unrelated streams and no two schemes can collide.
"""
from __future__ import annotations

_MASK64 = (1 << 64) - 1

# Stream tags: the first part of a derivation, so different streams never share a seed.
PROMPT_ORDER, ROLLOUT, HELD_OUT = 1, 2, 3


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(base: int, *parts: int) -> int:
    """A well-mixed 63-bit seed (a valid ``torch.Generator.manual_seed``) from ``base`` and ``parts``."""
    h = 0
    for v in (base, *parts):
        h = _splitmix64(h ^ (int(v) & _MASK64))
    return h >> 1
