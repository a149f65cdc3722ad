"""The GP surface over (log2 repetitions, alpha) -> score, and the posterior distribution of the best alpha per R.

As in the paper: scikit-learn ``GaussianProcessRegressor`` with an anisotropic Matern(nu = 1.5) kernel (one length
scale for log2 R, one for alpha) times a constant, plus a ``WhiteKernel`` for run-to-run noise, on a normalised
target. The best alpha for a given R is a random variable under the posterior: draw latent surfaces f(alpha | R) on
the grid alpha = k/256 (the noise term removed, so draws are of the smooth surface, not of noisy observations), take
each draw's argmax, and histogram. The expected gain over alpha = 1 is E[max_alpha f(alpha) - f(1)] over draws
(never negative, optimistic where the surface is uncertain); the plug-in gain (posterior mean at its argmax minus
at alpha = 1) is reported beside it.

Higher score is better (for losses, pass the negated loss: tools/sweep.py collect does this).
"""

from __future__ import annotations

import csv
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from megatron_dual.logging import pyplot

__all__ = [
    "ResultsError",
    "Results",
    "load_results",
    "SurfaceFit",
    "fit_surface",
    "BestAlpha",
    "best_alpha_posterior",
    "plot_surface",
    "plot_best_alpha",
    "format_fit",
    "run_planner_report",
    "planner_report",
]

REQUIRED = ("repetitions", "alpha", "score")
ALPHA_GRID = np.arange(257) / 256.0


class ResultsError(ValueError):
    """results.csv is malformed; the message names the file, the line and the value."""


@dataclass
class Results:
    repetitions: np.ndarray
    alpha: np.ndarray
    score: np.ndarray
    model_size: np.ndarray | None
    path: str

    def __len__(self) -> int:
        return int(self.score.size)


def _number(path: str, line: int, column: str, raw: str) -> float:
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise ResultsError(f"{path}:{line}: column {column!r} = {raw!r} is not a number") from None
    if not math.isfinite(value):
        raise ResultsError(f"{path}:{line}: column {column!r} = {raw!r} is not finite")
    return value


def _alpha(p: str, line: int, raw_alpha: str) -> float:
    """An alpha cell, a number or a fraction ("3/4"), checked to lie in [0, 1]."""
    if "/" in raw_alpha:
        num, _, den = raw_alpha.partition("/")
        a = (
            _number(p, line, "alpha", num) / _number(p, line, "alpha", den)
            if _number(p, line, "alpha", den) != 0
            else math.nan
        )
        if not math.isfinite(a):
            raise ResultsError(f"{p}:{line}: column 'alpha' = {raw_alpha!r} divides by zero")
    else:
        a = _number(p, line, "alpha", raw_alpha)
    if not 0.0 <= a <= 1.0:
        raise ResultsError(f"{p}:{line}: alpha = {raw_alpha} is outside [0, 1] (1 = pure AR, 0 = pure MD)")
    return a


def _row(p: str, line: int, row: dict, has_size: bool) -> tuple[float, float, float, float | None]:
    """(repetitions, alpha, score, model_size or None when the file has no such column) of one data row."""
    a = _alpha(p, line, (row["alpha"] or "").strip())
    r = _number(p, line, "repetitions", (row["repetitions"] or "").strip())
    if r < 1:
        raise ResultsError(
            f"{p}:{line}: repetitions = {row['repetitions'].strip()} is below 1 (R = budget "
            f"tokens / unique tokens >= 1)"
        )
    s = _number(p, line, "score", (row["score"] or "").strip())
    size = None
    if has_size:
        raw = (row.get("model_size") or "").strip()
        size = _number(p, line, "model_size", raw) if raw else math.nan
    return r, a, s, size


def _read_rows(p: str) -> tuple[list[tuple[float, float, float, float | None]], bool]:
    """The data rows of results.csv (blank rows skipped) and whether it has a model_size column."""
    with open(p, newline="") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip() for h in (reader.fieldnames or [])]
        reader.fieldnames = header
        missing = [c for c in REQUIRED if c not in header]
        if missing:
            raise ResultsError(
                f"{p}:1: missing column {missing[0]!r} (header has: {', '.join(header) or 'nothing'};"
                f" required: {', '.join(REQUIRED)})"
            )
        has_size = "model_size" in header
        rows = []
        for row in reader:
            line = reader.line_num
            if not any((v or "").strip() for v in row.values()):
                continue
            rows.append(_row(p, line, row, has_size))
    return rows, has_size


def _select_size(
    p: str, arrays: tuple[np.ndarray, ...], size_arr: np.ndarray | None, model_size: float | None
) -> tuple[tuple[np.ndarray, ...], np.ndarray | None]:
    """Keep the rows of ``model_size``; without it, refuse a file that mixes several sizes."""
    if size_arr is not None:
        distinct = sorted({float(x) for x in size_arr if math.isfinite(x)})
        if model_size is not None:
            keep = np.isclose(size_arr, model_size)
            if not keep.any():
                raise ResultsError(
                    f"{p}: no rows with model_size = {model_size:g} (sizes present: "
                    f"{', '.join(f'{d:g}' for d in distinct)})"
                )
            return tuple(x[keep] for x in arrays), size_arr[keep]
        if len(distinct) > 1:
            raise ResultsError(
                f"{p}: rows of {len(distinct)} model sizes ({', '.join(f'{d:g}' for d in distinct)}):"
                f" fit one surface per size, choose with --model-size"
            )
    elif model_size is not None:
        raise ResultsError(f"{p}: --model-size given but the file has no model_size column")
    return arrays, size_arr


def load_results(path: str | Path, model_size: float | None = None) -> Results:
    """Read results.csv (columns repetitions, alpha, score; optional model_size). Errors name file, line, value.

    ``alpha`` may be a fraction ("3/4"). With several model sizes in the file, ``model_size`` selects one."""
    p = str(path)
    if Path(p).is_dir():
        raise ResultsError(f"{p}: is a directory, not a results CSV")
    if not Path(p).is_file():
        raise ResultsError(f"{p}: no such file")
    try:
        rows, has_size = _read_rows(p)
    except UnicodeDecodeError as e:
        raise ResultsError(f"{p}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    if not rows:
        raise ResultsError(f"{p}: no data rows")
    size_arr = np.asarray([row[3] for row in rows], dtype=float) if has_size else None
    arrays = tuple(np.asarray([row[i] for row in rows], dtype=float) for i in range(3))
    (r_arr, a_arr, s_arr), size_arr = _select_size(p, arrays, size_arr, model_size)
    return Results(r_arr, a_arr, s_arr, size_arr, p)


# ------------------------------------------------------------------------------------------------ fitting


@dataclass
class SurfaceFit:
    gp: object  # fitted sklearn GaussianProcessRegressor
    r2: float  # in-sample, posterior mean vs observed scores
    r2_loo: float  # leave-one-out with the fitted hyperparameters held fixed
    length_scales: tuple[float, float]  # (log2 R, alpha)
    amplitude: float  # constant kernel (on the normalised target)
    noise: float  # white-noise level (on the normalised target)
    n: int
    log_r_range: tuple[float, float]

    def predict(self, repetitions: np.ndarray, alpha: np.ndarray, return_std: bool = False):
        x = np.column_stack([np.log2(np.asarray(repetitions, float)), np.asarray(alpha, float)])
        return self.gp.predict(x, return_std=return_std)


def _kernel():
    from sklearn.gaussian_process.kernels import ConstantKernel, Matern, WhiteKernel

    return ConstantKernel(1.0, (1e-3, 1e3)) * Matern(
        length_scale=[2.0, 0.3], length_scale_bounds=(1e-2, 1e3), nu=1.5
    ) + WhiteKernel(noise_level=1e-2, noise_level_bounds=(1e-8, 1e1))


def _r2(y: np.ndarray, pred: np.ndarray) -> float:
    ss_res = float(((y - pred) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    return 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")


def fit_surface(results: Results, *, restarts: int = 8, seed: int = 0) -> SurfaceFit:
    """Fit the GP (anisotropic Matern nu=1.5 + WhiteKernel, inputs (log2 R, alpha), normalised target)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.gaussian_process import GaussianProcessRegressor

    n = len(results)
    if n < 3:
        raise ResultsError(f"{results.path}: {n} rows; the surface needs at least 3 (a grid of R x alpha)")
    if np.ptp(results.score) == 0:
        raise ResultsError(f"{results.path}: every score is {results.score[0]:g}: nothing to fit")
    x = np.column_stack([np.log2(results.repetitions), results.alpha])
    y = results.score
    gp = GaussianProcessRegressor(_kernel(), normalize_y=True, n_restarts_optimizer=restarts, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        gp.fit(x, y)
    k = gp.kernel_
    const, matern, white = k.k1.k1, k.k1.k2, k.k2
    pred = gp.predict(x)
    # leave-one-out with hyperparameters fixed: closed form from the inverse kernel matrix (Rasmussen & Williams 5.12)
    kmat = k(x)
    inv = np.linalg.inv(kmat)
    y_norm = (y - gp._y_train_mean) / gp._y_train_std
    loo_norm = y_norm - (inv @ y_norm) / np.diag(inv)
    loo = loo_norm * gp._y_train_std + gp._y_train_mean
    ls = np.atleast_1d(matern.length_scale).astype(float)
    return SurfaceFit(
        gp,
        _r2(y, pred),
        _r2(y, loo),
        (float(ls[0]), float(ls[-1])),
        float(const.constant_value),
        float(white.noise_level),
        n,
        (float(x[:, 0].min()), float(x[:, 0].max())),
    )


@dataclass
class BestAlpha:
    repetitions: float
    alpha_grid: np.ndarray
    probability: np.ndarray  # P(best alpha = alpha_grid[i])
    mean_curve: np.ndarray  # posterior mean score over alpha_grid
    expected_gain: float  # E[max f - f(alpha=1)] over draws (>= 0 by construction: optimistic under uncertainty)
    gain_std: float
    plugin_gain: float  # posterior mean at argmax of the mean minus posterior mean at alpha = 1
    map_alpha: float  # most probable best alpha, at 1/16 resolution (bins centred on k/16)
    median: float  # median of the best-alpha distribution
    mean_best_alpha: float  # argmax of the posterior mean
    interval: tuple[float, float]  # central 80% of the best-alpha distribution

    def prob_within(self, lo: float, hi: float) -> float:
        sel = (self.alpha_grid >= lo - 1e-12) & (self.alpha_grid <= hi + 1e-12)
        return float(self.probability[sel].sum())


def best_alpha_posterior(
    fit: SurfaceFit, repetitions: float, *, samples: int = 2000, seed: int = 0, alpha_grid: np.ndarray = ALPHA_GRID
) -> BestAlpha:
    """Distribution of argmax_alpha f(R, alpha) under the GP posterior (latent f: the white noise is removed)."""
    grid = np.asarray(alpha_grid, float)
    x = np.column_stack([np.full(grid.size, math.log2(repetitions)), grid])
    mean, cov = fit.gp.predict(x, return_cov=True)
    # sklearn's predictive covariance includes the WhiteKernel term on the diagonal (in target units)
    noise = fit.noise * float(np.atleast_1d(fit.gp._y_train_std)[0]) ** 2
    cov = cov - noise * np.eye(grid.size)
    cov = 0.5 * (cov + cov.T)
    jitter = 1e-10 * max(1e-12, float(np.abs(np.diag(cov)).max()))
    w, v = np.linalg.eigh(cov)
    root = v * np.sqrt(np.clip(w, 0, None) + jitter)
    rng = np.random.default_rng(seed)
    draws = mean[None, :] + rng.standard_normal((samples, grid.size)) @ root.T
    best = draws.argmax(axis=1)
    prob = np.bincount(best, minlength=grid.size) / samples
    one = int(np.argmin(np.abs(grid - 1.0)))
    gains = draws.max(axis=1) - draws[:, one]
    cdf = np.cumsum(prob)
    lo = float(grid[int(np.searchsorted(cdf, 0.1))])
    med = float(grid[min(grid.size - 1, int(np.searchsorted(cdf, 0.5)))])
    hi = float(grid[min(grid.size - 1, int(np.searchsorted(cdf, 0.9)))])
    # the single most probable grid point is noisy (and piles up at the edges); take the mode of 1/16-wide bins
    centres = np.arange(17) / 16.0
    binned = np.bincount(np.rint(grid * 16).astype(int), weights=prob, minlength=17)
    return BestAlpha(
        float(repetitions),
        grid,
        prob,
        mean,
        float(gains.mean()),
        float(gains.std()),
        float(mean.max() - mean[one]),
        float(centres[int(binned.argmax())]),
        med,
        float(grid[int(mean.argmax())]),
        (lo, hi),
    )


# ------------------------------------------------------------------------------------------------ reporting


def format_fit(fit: SurfaceFit) -> str:
    return (
        f"GP fit on {fit.n} runs: R^2 = {fit.r2:.4f} (in-sample), {fit.r2_loo:.4f} (leave-one-out); "
        f"length scales: log2 R {fit.length_scales[0]:.3g}, alpha {fit.length_scales[1]:.3g}; "
        f"amplitude {fit.amplitude:.3g}, white noise {fit.noise:.3g} (normalised target)"
    )


def _overlay_best(ax: Any, best: list[BestAlpha] | None) -> None:
    """The best alpha per R (posterior median and 80% interval) on the surface plot."""
    if best:
        ax.errorbar(
            [math.log2(b.repetitions) for b in best],
            [b.median for b in best],
            yerr=[[b.median - b.interval[0] for b in best], [b.interval[1] - b.median for b in best]],
            fmt="o",
            color="orange",
            capsize=3,
            label="best alpha: median, 80% interval",
        )


def _overlay_rule(ax: Any, lr: np.ndarray) -> None:
    """The paper's rule of thumb, min(63/64, 16/R), over the plotted range of log2 R."""
    from megatron_dual.planning.rules import recommend_alpha

    rr = 2.0**lr
    ax.plot(
        lr,
        [recommend_alpha(max(1.0, r)).alpha for r in rr],
        color="white",
        ls="--",
        lw=1.2,
        label="paper's rule: min(63/64, 16/R)",
    )


def plot_surface(
    fit: SurfaceFit,
    results: Results,
    png: str | Path,
    title: str = "",
    best: list[BestAlpha] | None = None,
    rule: bool = True,
) -> None:
    plt = pyplot()

    lo, hi = fit.log_r_range
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    lr = np.linspace(lo, hi, 80)
    al = np.linspace(0, 1, 101)
    gr, ga = np.meshgrid(lr, al)
    z = fit.gp.predict(np.column_stack([gr.ravel(), ga.ravel()])).reshape(ga.shape)
    fig, ax = plt.subplots(figsize=(7.5, 5))
    im = ax.pcolormesh(gr, ga, z, shading="auto", cmap="viridis")
    fig.colorbar(im, ax=ax, label="posterior mean score")
    sc = ax.scatter(
        np.log2(results.repetitions),
        results.alpha,
        c=results.score,
        cmap="viridis",
        vmin=z.min(),
        vmax=z.max(),
        edgecolors="white",
        s=60,
        label="observed runs",
    )
    del sc
    best_i = z.argmax(axis=0)
    ax.plot(lr, al[best_i], color="red", lw=1.5, label="argmax of posterior mean")
    _overlay_best(ax, best)
    if rule:
        _overlay_rule(ax, lr)
    ax.set_xlabel("log2 repetitions R")
    ax.set_ylabel("alpha (AR share)")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7, loc="best", framealpha=0.6)
    ax.set_title(title or "GP surface (Matern 1.5 + white noise)", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def plot_best_alpha(best: list[BestAlpha], png: str | Path, title: str = "", bin_width: float = 1 / 32) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    edges = np.arange(0, 1 + bin_width + 1e-9, bin_width)
    colours = plt.cm.plasma(np.linspace(0, 0.85, max(1, len(best))))
    for b, c in zip(best, colours, strict=True):
        hist, _ = np.histogram(b.alpha_grid, bins=edges, weights=b.probability)
        centres = 0.5 * (edges[:-1] + edges[1:])
        ax.plot(centres, hist / bin_width, color=c, label=f"R = {b.repetitions:g} (gain {b.expected_gain:+.3g})")
        ax.fill_between(centres, hist / bin_width, color=c, alpha=0.15)
    ax.set_xlabel("best alpha")
    ax.set_ylabel("posterior density")
    ax.set_xlim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title(title or "posterior distribution of the best alpha per R", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def run_planner_report(
    csv_path: str | Path,
    out_dir: str | Path,
    *,
    repetitions: list[float] | None = None,
    samples: int = 2000,
    seed: int = 0,
    model_size: float | None = None,
    title: str = "",
) -> str:
    """Fit, sample, plot (alpha_surface.png, best_alpha.png under ``out_dir``) and return the text report."""
    return planner_report(
        csv_path,
        out_dir,
        extra_repetitions=repetitions or (),
        samples=samples,
        seed=seed,
        model_size=model_size,
        title=title,
    )[0]


def planner_report(
    csv_path: str | Path,
    out_dir: str | Path,
    *,
    extra_repetitions: Sequence[float] = (),
    samples: int = 2000,
    seed: int = 0,
    model_size: float | None = None,
    title: str = "",
) -> tuple[str, list[BestAlpha], SurfaceFit]:
    """:func:`run_planner_report` returning also the best-alpha posteriors (observed R values and
    ``extra_repetitions``) and the fit."""
    res = load_results(csv_path, model_size=model_size)
    fit = fit_surface(res, seed=seed)
    reps = sorted(set(res.repetitions.tolist()) | {float(r) for r in extra_repetitions})
    best = [best_alpha_posterior(fit, r, samples=samples, seed=seed + i) for i, r in enumerate(reps)]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot_surface(fit, res, out / "alpha_surface.png", title=title, best=best)
    plot_best_alpha(best, out / "best_alpha.png", title=title)
    lines = [
        format_fit(fit),
        "best alpha per R (posterior sampling, alpha on the k/256 grid):",
        f"  {'R':>6}  {'mode':>6}  {'median':>6}  {'80% interval':>15}  {'argmax mean':>11}  "
        f"{'P(mode+-1/16)':>13}  {'E[max f - f(1)]':>17}  {'mean gain at argmax':>19}",
    ]
    for b in best:
        lo, hi = fit.log_r_range
        extrapolated = not lo - 1e-9 <= math.log2(b.repetitions) <= hi + 1e-9
        lines.append(
            f"  {b.repetitions:>6g}  {b.map_alpha:>6.3f}  {b.median:>6.3f}  "
            f"[{b.interval[0]:.3f}, {b.interval[1]:.3f}]  "
            f"{b.mean_best_alpha:>11.3f}  {b.prob_within(b.map_alpha - 1 / 16, b.map_alpha + 1 / 16):>13.2f}"
            f"  {b.expected_gain:>+9.4g} +- {b.gain_std:<5.2g}  {b.plugin_gain:>+19.4g}"
            + ("  (outside the observed R range: extrapolated)" if extrapolated else "")
        )
    lines.append(f"plots: {out / 'alpha_surface.png'}, {out / 'best_alpha.png'}")
    return "\n".join(lines), best, fit
