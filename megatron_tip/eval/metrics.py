"""mean@k and the unbiased pass@k estimator (Chen et al. 2021, "Evaluating LLMs trained on code")."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of P(at least one of k samples is correct) from n samples with c correct.

    ``1 - C(n-c, k) / C(n, k)``, computed as a running product to stay stable for large n.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def mean_at_k(correct: Sequence[bool]) -> float:
    """Mean accuracy over the k samples of one problem (mean@k with k = len(correct))."""
    if len(correct) == 0:
        raise ValueError("mean_at_k: no samples")
    return float(np.mean(np.asarray(correct, dtype=np.float64)))


def default_ks(n: int) -> list[int]:
    """Powers of two up to ``n``, plus ``n`` itself: 1, 2, 4, ..., n."""
    ks = [1 << i for i in range(n.bit_length()) if (1 << i) <= n]
    return ks if ks[-1] == n else ks + [n]


def problem_metrics(correct: Sequence[bool], *, ks: Sequence[int] | None = None) -> dict:
    """Per-problem ``mean`` and ``pass@k`` for each k (default: :func:`default_ks`)."""
    n, c = len(correct), int(sum(bool(x) for x in correct))
    ks = default_ks(n) if ks is None else ks
    return {"n": n, "num_correct": c, "mean": mean_at_k(correct),
            "pass@k": {int(k): pass_at_k(n, c, k) for k in ks if k <= n}}


def aggregate(per_problem: Sequence[Sequence[bool]], *, ks: Sequence[int] | None = None) -> dict:
    """Dataset-level ``mean@n`` and ``pass@k`` (averages of the per-problem values), with spreads.

    - ``mean@n_std``: standard deviation across problems of the per-problem mean (ddof 1);
    - ``mean@n_se``: its standard error, ``mean@n_std / sqrt(problems)`` (the ± we report);
    - ``mean@n_std_samples``: standard deviation across the n sample sets of their accuracy
      (sample j of every problem is one evaluation run; ddof 1).
    NaN where undefined (one problem / one sample). The paper reports "mean@16 ± std" without
    saying which spread; we report these three, named.
    Every problem must have the same number of samples n, so mean@n and pass@k are comparable.
    """
    if not per_problem:
        raise ValueError("aggregate: no problems")
    ns = {len(c) for c in per_problem}
    if len(ns) != 1:
        raise ValueError(f"aggregate: problems have different sample counts {sorted(ns)}")
    n = ns.pop()
    ks = default_ks(n) if ks is None else [k for k in ks if k <= n]
    rows = [problem_metrics(c, ks=ks) for c in per_problem]
    means = np.array([r["mean"] for r in rows], dtype=np.float64)
    runs = np.asarray(per_problem, dtype=np.float64).mean(0)  # accuracy of each sample set, [n]
    std = float(means.std(ddof=1)) if len(means) > 1 else float("nan")
    return {"num_problems": len(rows), "samples": n,
            f"mean@{n}": float(means.mean()), f"mean@{n}_std": std,
            f"mean@{n}_se": std / float(np.sqrt(len(means))),
            f"mean@{n}_std_samples": float(runs.std(ddof=1)) if n > 1 else float("nan"),
            "pass@k": {k: float(np.mean([r["pass@k"][k] for r in rows])) for k in ks}}
