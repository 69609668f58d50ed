"""``healer forecast``: how many healing tokens recover X% of what pruning lost, from a (pilot) heal's curve.

The validation loss of a heal is fitted as ``loss(t) = L_inf + A * t**-alpha`` (t: tokens trained). For a
given alpha the model is linear in (L_inf, A), so the fit is exact least squares on a grid of alphas, refined
around the best one: no optimiser, no scipy. Recovering a fraction ``X`` of the gap between the pruned model's
loss (before any healing) and the dense model's means reaching ``pruned - X * (pruned - dense)``; the fit
answers when, or says the fitted curve levels off (``L_inf``) above that.

The uncertainty is a residual bootstrap: the fitted curve plus resampled residuals, refitted many times;
the answer is the median with a 10-90% interval, and the share of refits that never reach the target. It
measures how well the points pin the curve down, not whether a power law holds far past them: a forecast
far beyond the last point is flagged as an extrapolation.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from healer.core.errors import HealerError
from healer.train.recovery import RECOVERY_FILE


@dataclass(frozen=True)
class PowerLaw:
    l_inf: float
    a: float
    alpha: float
    rmse: float

    def loss(self, tokens) -> np.ndarray:
        return self.l_inf + self.a * np.asarray(tokens, dtype=np.float64) ** -self.alpha

    def tokens_for(self, loss: float) -> float:
        """Tokens at which the curve reaches ``loss``; inf when it levels off above it."""
        if loss <= self.l_inf:
            return math.inf
        return float((self.a / (loss - self.l_inf)) ** (1.0 / self.alpha))


def _linear_fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """(L_inf, A, sse) of y = L_inf + A * x by least squares."""
    design = np.stack([np.ones_like(x), x], axis=1)
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    sse = float(((design @ coef - y) ** 2).sum())
    return float(coef[0]), float(coef[1]), sse


def fit_power_law(tokens, losses, alphas: np.ndarray | None = None) -> PowerLaw:
    """Least-squares ``loss = L_inf + A * tokens**-alpha`` with A > 0 (the loss falls) over points with tokens > 0.

    Args:
        tokens, losses: the curve (e.g. ``data/tokens_seen`` and ``val/loss`` of each validation pass).
        alphas: the grid of exponents tried first (default 0.02 .. 3, log-spaced); the best is refined.
    """
    t = np.asarray(tokens, dtype=np.float64)
    y = np.asarray(losses, dtype=np.float64)
    keep = (t > 0) & np.isfinite(y)
    t, y = t[keep], y[keep]
    if len(t) < 3:
        raise HealerError(f"forecast: {len(t)} usable points (tokens > 0, finite loss); a fit of three parameters "
                          "needs at least 3 validation passes (lower cpt.eval_every or train longer)")
    scale = t.max()  # tokens in units of the largest: keeps t**-alpha in a sane range
    u = t / scale
    grid = np.geomspace(0.02, 3.0, 150) if alphas is None else np.asarray(alphas, dtype=np.float64)
    best = None
    for _ in range(3):  # the grid, then two finer grids around the best alpha
        for alpha in grid:
            l_inf, a, sse = _linear_fit(u ** -alpha, y)
            if a > 0 and (best is None or sse < best[3]):
                best = (l_inf, a, alpha, sse)
        if best is None:
            break
        step = grid[1] / grid[0] if len(grid) > 1 else 1.1
        grid = np.geomspace(best[2] / step, best[2] * step, 21)
    if best is None:
        raise HealerError("forecast: the loss does not fall over these points, so no decaying power law fits them")
    l_inf, a, alpha, sse = best
    # Back to raw tokens: A * (t/scale)^-alpha = (A * scale^alpha) * t^-alpha.
    return PowerLaw(l_inf, a * scale ** alpha, alpha, math.sqrt(sse / len(t)))


@dataclass
class Forecast:
    fit: PowerLaw
    target_loss: float
    tokens: float  # from the fit on all points (inf: never)
    low: float  # 10th / 90th percentile over bootstrap refits
    high: float
    unreachable: float  # share of refits whose curve levels off above the target
    last_tokens: float  # the last point fitted: beyond it the answer is an extrapolation
    samples: list[float] = field(default_factory=list, repr=False)


def forecast(tokens, losses, *, pruned_loss: float, dense_loss: float, recovery: float, boots: int = 200,
             seed: int = 0) -> Forecast:
    """Tokens predicted to recover ``recovery`` (0..1) of the gap ``pruned_loss - dense_loss``, with a
    residual-bootstrap interval (``boots`` refits, reproducible through ``seed``)."""
    if not 0 < recovery <= 1:
        raise HealerError(f"forecast: recovery {recovery} must be in (0, 1], e.g. 0.9 for 90% of the gap")
    if not pruned_loss > dense_loss:
        raise HealerError(f"forecast: the pruned model's loss {pruned_loss:.4f} is not above the dense model's "
                          f"{dense_loss:.4f}; there is no gap to recover")
    target = pruned_loss - recovery * (pruned_loss - dense_loss)
    t = np.asarray(tokens, dtype=np.float64)
    y = np.asarray(losses, dtype=np.float64)
    keep = (t > 0) & np.isfinite(y)
    t, y = t[keep], y[keep]
    fit = fit_power_law(t, y)
    residuals = y - fit.loss(t)
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(boots):
        resampled = fit.loss(t) + rng.choice(residuals, size=len(residuals), replace=True)
        try:
            samples.append(fit_power_law(t, resampled).tokens_for(target))
        except HealerError:
            samples.append(math.inf)
    arr = np.array(samples)
    low, high = (np.quantile(arr, [0.1, 0.9], method="nearest") if boots else (math.nan, math.nan))
    return Forecast(fit, target, fit.tokens_for(target), float(low), float(high),
                    float(np.isinf(arr).mean()) if boots else math.nan, float(t.max()), samples)


# -- reading a run --------------------------------------------------------------------------------------

def read_curve(path: Path, metric: str = "val/loss") -> tuple[list[float], list[float]]:
    """(tokens seen, ``metric``) of every logged step of a ``metrics.jsonl`` that has ``metric``."""
    tokens, values = [], []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise HealerError(f"forecast: cannot read {path} ({err}); give a cpt stage directory or its "
                          "metrics.jsonl") from None
    for n, line in enumerate(lines, start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        if not isinstance(row, dict):
            raise HealerError(f"forecast: {path} line {n} is not a metrics row; give a metrics.jsonl")
        if metric in row and "data/tokens_seen" in row:
            tokens.append(float(row["data/tokens_seen"]))
            values.append(float(row[metric]))
    return tokens, values


def _fmt(tokens: float) -> str:
    if math.isinf(tokens):
        return "never"
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if tokens >= size:
            return f"{tokens / size:.3g}{unit}"
    return f"{tokens:.0f}"


@dataclass
class Options:
    """``healer forecast`` flags."""

    run: str = field(default="", metadata={
        "help": "a cpt stage directory (its metrics.jsonl and recovery.json)", "positional": True})
    metrics: str | None = field(default=None, metadata={
        "help": "a metrics.jsonl anywhere (instead of RUN); its recovery.json is looked for beside it"})
    recovery: str = field(default="0.5,0.8,0.9", metadata={
        "help": "comma-separated fractions of the pruned-dense gap to forecast the tokens for"})
    pruned_loss: float | None = field(default=None, metadata={
        "help": "validation loss of the pruned model before healing (default: recovery.json's)"})
    dense_loss: float | None = field(default=None, metadata={
        "help": "validation loss of the dense model on the same batches (default: recovery.json's)"})
    fit_tokens: float | None = field(default=None, metadata={
        "help": "fit only the points up to this many tokens and report the error on the rest (a check)"})
    metric: str = field(default="val/loss", metadata={"help": "the metrics.jsonl key to fit"})
    boots: int = field(default=200, metadata={"help": "bootstrap refits for the interval"})


def run_forecast(recipe, opts: Options) -> int:
    """The ``healer forecast`` verb: fit the run's curve, print the tokens for each recovery target."""
    if not opts.run and not opts.metrics:
        raise HealerError("forecast: which run? healer forecast RUN/cpt (a cpt stage directory), or --metrics FILE")
    metrics = Path(opts.metrics) if opts.metrics else Path(opts.run) / "metrics.jsonl"
    if not metrics.is_file():
        raise HealerError(f"forecast: {metrics} does not exist; give a cpt stage directory (healer forecast "
                          "RUN/cpt) or --metrics path/to/metrics.jsonl")
    try:
        targets = [float(x) for x in opts.recovery.split(",") if x.strip()]
    except ValueError:
        raise HealerError(f"--recovery: {opts.recovery!r} is not a comma-separated list of fractions") from None
    baseline = {}
    if (metrics.parent / RECOVERY_FILE).is_file():
        baseline = json.loads((metrics.parent / RECOVERY_FILE).read_text())
    pruned = opts.pruned_loss if opts.pruned_loss is not None else baseline.get("pruned_val_loss")
    dense = opts.dense_loss if opts.dense_loss is not None else baseline.get("dense_val_loss")
    if pruned is None or dense is None:
        raise HealerError(f"forecast: no {RECOVERY_FILE} beside {metrics} (the cpt stage writes it when "
                          "cpt.stop_at_recovery is set); give --pruned-loss and --dense-loss")
    tokens, losses = read_curve(metrics, opts.metric)
    held_t, held_y = [], []
    if opts.fit_tokens is not None:
        held_t = [t for t in tokens if t > opts.fit_tokens]
        held_y = [y for t, y in zip(tokens, losses) if t > opts.fit_tokens]
        losses = [y for t, y in zip(tokens, losses) if t <= opts.fit_tokens]
        tokens = [t for t in tokens if t <= opts.fit_tokens]
    print(f"healer forecast: {len(tokens)} points of {opts.metric} from {metrics}; pruned {pruned:.4f}, "
          f"dense {dense:.4f}")
    for target in targets:
        fc = forecast(tokens, losses, pruned_loss=pruned, dense_loss=dense, recovery=target, boots=opts.boots)
        beyond = (" (extrapolated past the last point)" if fc.tokens > fc.last_tokens * 1.5
                  else " (before the first point)" if fc.tokens < min(tokens) else "")
        never = f"; {fc.unreachable:.0%} of refits never reach it" if fc.unreachable else ""
        print(f"  {target:.0%} of the gap (loss {fc.target_loss:.4f}): {_fmt(fc.tokens)} tokens, "
              f"80% interval {_fmt(fc.low)} .. {_fmt(fc.high)}{never}{beyond}")
    fit = fc.fit
    print(f"  fit: loss = {fit.l_inf:.4f} + {fit.a:.4g} * tokens^-{fit.alpha:.3f}  (rmse {fit.rmse:.4f}); "
          f"levels off at {fit.l_inf:.4f} = {(pruned - fit.l_inf) / (pruned - dense):.0%} of the gap")
    if held_t:
        predicted = fit.loss(held_t)
        err = np.abs(predicted - np.asarray(held_y))
        rel = err / np.asarray(held_y)
        print(f"  check on {len(held_t)} later points ({_fmt(min(held_t))} .. {_fmt(max(held_t))} tokens): mean "
              f"|error| {err.mean():.4f} ({rel.mean():.2%}), at the last {err[-1]:.4f} ({rel[-1]:.2%})")
    return 0
