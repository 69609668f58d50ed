"""A sparsity pattern: unstructured at a ratio, or N:M. Plain data, so a recipe is checked without torch."""

from __future__ import annotations

from dataclasses import dataclass

from healer.core.errors import HealerError


@dataclass(frozen=True)
class Pattern:
    """Unstructured at ``ratio``, or N:M -- at most ``n`` nonzeros in every ``m`` consecutive input weights."""

    ratio: float
    n: int | None = None
    m: int | None = None

    @property
    def is_nm(self) -> bool:
        return self.m is not None

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_nm else f"unstructured {self.ratio:g}"


def parse_pattern(pattern: str, ratio: float | None, key: str = "prune.sparsity") -> Pattern:
    """Check ``pattern`` ("unstructured" or "N:M") and ``ratio`` together; errors name ``key``.

    For N:M the ratio is implied (1 - N/M); a ratio given as well must agree with it.
    """
    text = str(pattern).strip()
    if text == "unstructured":
        if ratio is None:
            raise HealerError(f"{key}.ratio is required for pattern 'unstructured' (e.g. 0.5 zeros half the weights)")
        if not 0.0 < ratio < 1.0:
            raise HealerError(f"{key}.ratio must be between 0 and 1 (exclusive), got {ratio}")
        return Pattern(float(ratio))
    parts = text.split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise HealerError(f"{key}.pattern: {pattern!r} is neither 'unstructured' nor N:M like '2:4' or '4:8'")
    n, m = (int(p) for p in parts)
    if not 0 < n < m:
        raise HealerError(f"{key}.pattern: {pattern!r} must keep N of M weights with 0 < N < M (e.g. '2:4')")
    implied = 1.0 - n / m
    if ratio is not None and abs(ratio - implied) > 1e-9:
        raise HealerError(f"{key}.ratio {ratio} contradicts pattern {pattern!r}, which zeros {implied:g} of the "
                          "weights; leave the ratio out")
    return Pattern(implied, n, m)
