"""Small statistics for comparing repeated timings, standard library only."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

_EXACT_MAX_N = 40  # above this the exact U distribution is slow in Python and the normal approximation is good
# Student t 97.5% quantiles for 1..30 degrees of freedom (two-sided 95%); above 30 a Cornish-Fisher expansion
# around the normal quantile is good to 1e-4.
_T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788, 2.1604,
         2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555,
         2.0518, 2.0484, 2.0452, 2.0423)
_Z975 = 1.959964


def t_interval(values: Sequence[float]) -> tuple[float, float]:
    """Mean and half-width of its two-sided 95% Student t confidence interval (NaN half-width below 2 values)."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = math.fsum(values) / n
    if n < 2:
        return mean, math.nan
    sd = math.sqrt(math.fsum((x - mean) ** 2 for x in values) / (n - 1))
    df, z = n - 1, _Z975
    t = _T975[df - 1] if df <= len(_T975) else (
        z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)
        + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * df ** 3))
    return mean, t * sd / math.sqrt(n)


def median_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float] | None:
    """A distribution-free interval for the median of ``values``: the ``k``-th smallest and ``k``-th largest, with
    ``k`` the largest whose binomial tails leave at least ``confidence`` between them; None for too few values
    (below 6 at 95%)."""
    n, ordered = len(values), sorted(values)
    tail, k = 0.0, 0
    while k < n // 2:
        tail += math.comb(n, k) / 2 ** n  # P(at most k of n values fall below the median)
        if 2 * tail > 1 - confidence:
            break
        k += 1
    return (ordered[k - 1], ordered[n - k]) if k else None


def mann_whitney_p(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p-value of the Mann-Whitney U test that ``a`` and ``b`` come from the same distribution.

    Exact when there are no ties and the samples are small (repeats of a benchmark always are); otherwise the
    normal approximation with tie and continuity corrections.
    """
    m, n = len(a), len(b)
    if m == 0 or n == 0:
        return 1.0
    ranks = _midranks(list(a) + list(b))
    u = sum(ranks[:m]) - m * (m + 1) / 2
    has_ties = len(set(ranks)) < m + n
    if not has_ties and m + n <= _EXACT_MAX_N:
        total = math.comb(m + n, m)
        below = sum(_u_counts(m, n)[: int(u) + 1]) / total
        above = sum(_u_counts(m, n)[int(u):]) / total
        return min(1.0, 2 * min(below, above))
    mean = m * n / 2
    tie_term = sum(t ** 3 - t for t in _tie_sizes(ranks)) / ((m + n) * (m + n - 1))
    variance = m * n / 12 * ((m + n + 1) - tie_term)
    if variance <= 0:
        return 1.0
    z = max(abs(u - mean) - 0.5, 0.0) / math.sqrt(variance)
    return min(1.0, math.erfc(z / math.sqrt(2)))


def smallest_p(m: int, n: int) -> float:
    """The smallest two-sided p-value the exact test can reach with ``m`` and ``n`` samples.

    When it is not below the significance level, no amount of difference can be significant: there are
    not enough repeats.
    """
    if m == 0 or n == 0:
        return 1.0
    return min(1.0, 2 / math.comb(m + n, m))


@lru_cache(maxsize=64)
def _u_counts(m: int, n: int) -> tuple[int, ...]:
    """How many orderings of m + n distinct values give each U = 0 .. m*n."""
    # counts[j][u] for the current m, built up one sample of ``a`` at a time: f(i, j) = f(i-1, j)<<j + f(i, j-1)
    prev = [[1] for _ in range(n + 1)]  # i = 0: one ordering, U = 0
    for i in range(1, m + 1):
        cur = [[1]]  # j = 0: one ordering, U = 0
        for j in range(1, n + 1):
            size = i * j + 1
            row = [0] * size
            for u, c in enumerate(prev[j]):  # the largest value is from a: it beats all j values of b
                row[u + j] += c
            for u, c in enumerate(cur[j - 1]):  # the largest value is from b
                row[u] += c
            cur.append(row)
        prev = cur
    return tuple(prev[n])


def _midranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def _tie_sizes(ranks: list[float]) -> list[int]:
    sizes: dict[float, int] = {}
    for r in ranks:
        sizes[r] = sizes.get(r, 0) + 1
    return [s for s in sizes.values() if s > 1]
