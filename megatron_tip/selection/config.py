"""Selection configuration: which tokens get a gradient (paper §4–6; formulas in docs/method.md §2–3)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

POLICIES = ("all", "topk", "bottomk", "entropy_sampling", "random", "quadrants")
SCORES = ("soft_or", "entropy", "reverse_kl", "q3", "random")
SCOPES = ("per_sequence", "global")
NORMALIZATIONS = ("minmax", "rank")


@dataclass
class SelectionConfig:
    """Token-selection settings.

    policy: "all" (baseline), "topk"/"bottomk" by ``score``, "entropy_sampling"
      (p ∝ h without replacement, Table 3), "random" (uniform, same budget as topk),
      "quadrants" (keep every valid token in ``quadrants``; keep_ratio is ignored).
    score: "soft_or" (Eq. 7), "entropy" (raw h), "reverse_kl" (divergence-only,
      Table 8), "q3" (forward KL · (1 − ĥ), §7.3), "random".
    keep_ratio: ρ ∈ (0, 1]; per rollout keep ⌊ρ·m⌋ (scope "per_sequence") or over the
      global batch keep ⌊ρ·N⌋ (scope "global").
    min_keep_per_sequence: floor on the per-rollout budget (capped at m); per_sequence
      scope and entropy_sampling only.
    normalization: "minmax" (paper) or "rank" (mid-rank ECDF, robust to outliers).
    entropy_clip_percentile: clip h at this global-batch percentile before min-max.
    quadrants: kept quadrants for policy "quadrants" (1..4).
    h_threshold / kl_threshold: quadrant boundaries; None = exact global-batch median.
    seed: mixed with the step and the global rollout index for random policies.
    """

    policy: str = "topk"
    score: str = "soft_or"
    keep_ratio: float = 0.5
    scope: str = "per_sequence"
    min_keep_per_sequence: int = 0
    normalization: str = "minmax"
    entropy_clip_percentile: float = 98.0
    quadrants: list[int] = field(default_factory=lambda: [3])
    h_threshold: Optional[float] = None
    kl_threshold: Optional[float] = None
    seed: int = 0

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"SelectionConfig.{name}={getattr(self, name)!r}: {why}")

        for name, allowed in (("policy", POLICIES), ("score", SCORES), ("scope", SCOPES),
                              ("normalization", NORMALIZATIONS)):
            if getattr(self, name) not in allowed:
                raise bad(name, f"must be one of {allowed}")
        if isinstance(self.keep_ratio, bool) or not isinstance(self.keep_ratio, (int, float)) \
                or not (0.0 < float(self.keep_ratio) <= 1.0):
            raise bad("keep_ratio", "must be a number in (0, 1]")
        self.keep_ratio = float(self.keep_ratio)
        if isinstance(self.min_keep_per_sequence, bool) or not isinstance(self.min_keep_per_sequence, int) \
                or self.min_keep_per_sequence < 0:
            raise bad("min_keep_per_sequence", "must be an int >= 0")
        p = self.entropy_clip_percentile
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0.0 < float(p) <= 100.0):
            raise bad("entropy_clip_percentile", "must be a number in (0, 100]")
        self.entropy_clip_percentile = float(p)
        q = list(self.quadrants) if isinstance(self.quadrants, (list, tuple)) else None
        if not q or any(isinstance(v, bool) or v not in (1, 2, 3, 4) for v in q):
            raise bad("quadrants", "must be a non-empty list of quadrant ids in 1..4")
        self.quadrants = sorted(set(int(v) for v in q))
        for name in ("h_threshold", "kl_threshold"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                                  or not math.isfinite(float(v))):
                raise bad(name, "must be None or a finite number")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise bad("seed", "must be an int")
