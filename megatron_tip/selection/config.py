"""Selection configuration: which tokens get a gradient (paper §4–6; formulas in docs/method.md §2–3)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

POLICIES = ("all", "topk", "bottomk", "entropy_sampling", "random", "quadrants")
SCORES = ("soft_or", "entropy", "reverse_kl", "q3", "random")
SCOPES = ("per_sequence", "global")
NORMALIZATIONS = ("minmax", "rank")
THRESHOLD_MODES = ("median", "percentile", "fixed")
WEIGHTINGS = ("none", "inverse_inclusion")


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
    threshold_mode: how the quadrant boundaries are set (the paper gives no numbers, ours):
      "median" (default; exact global-batch medians, which forces share(Q2) = share(Q3) and
      share(Q1) = share(Q4) up to ties), "percentile" (the ``h_percentile`` /
      ``kl_percentile`` global-batch percentiles; forward KL uses ``kl_percentile``), "fixed"
      (``h_threshold`` / ``kl_threshold`` / ``fkl_threshold``, all required).
    h_threshold / kl_threshold / fkl_threshold: fixed boundaries on h, reverse KL and forward KL
      (forward KL: the logged Q3 share under forward KL). In the median/percentile modes a value
      set here overrides that one axis.
    h_percentile / kl_percentile: percentiles in (0, 100) for threshold_mode "percentile".
    weighting: "none" (paper) or "inverse_inclusion" (entropy_sampling, per_sequence only):
      weight each kept token by |T| / (N · π_t), π_t its inclusion probability, so the
      kept-token loss is an unbiased estimate of the all-token mean loss (ours).
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
    threshold_mode: str = "median"
    h_threshold: Optional[float] = None
    kl_threshold: Optional[float] = None
    fkl_threshold: Optional[float] = None
    h_percentile: float = 50.0
    kl_percentile: float = 50.0
    weighting: str = "none"
    seed: int = 0

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"SelectionConfig.{name}={getattr(self, name)!r}: {why}")

        for name, allowed in (("policy", POLICIES), ("score", SCORES), ("scope", SCOPES),
                              ("normalization", NORMALIZATIONS), ("threshold_mode", THRESHOLD_MODES),
                              ("weighting", WEIGHTINGS)):
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
        for name in ("h_threshold", "kl_threshold", "fkl_threshold"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                                  or not math.isfinite(float(v))):
                raise bad(name, "must be None or a finite number")
        if self.threshold_mode == "fixed":
            for name in ("h_threshold", "kl_threshold", "fkl_threshold"):
                if getattr(self, name) is None:
                    raise bad(name, "threshold_mode 'fixed' needs h_threshold, kl_threshold and fkl_threshold")
        for name in ("h_percentile", "kl_percentile"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0.0 < float(v) < 100.0):
                raise bad(name, "must be a number in (0, 100)")
            setattr(self, name, float(v))
        if self.weighting == "inverse_inclusion" and (self.policy != "entropy_sampling"
                                                      or self.scope != "per_sequence"):
            raise bad("weighting", "'inverse_inclusion' applies to policy 'entropy_sampling' with "
                                   "scope 'per_sequence' only")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise bad("seed", "must be an int")
