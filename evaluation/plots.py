"""The figures of docs/evaluation.md (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib as mpl

mpl.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from evaluation.boston import BostonResult
from evaluation.convergence import ConvergenceResult
from evaluation.digits import DigitsResult
from evaluation.metrics import ReliabilityBins

__all__ = ["boston_figure", "convergence_figure", "reliability_figure", "uncertainty_figure"]

_DPI = 110


def _save(figure: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    # metadata without a date, so an unchanged figure gives identical bytes
    figure.savefig(path, dpi=_DPI, bbox_inches="tight", metadata={"Software": None})
    plt.close(figure)
    return path


def _reliability_panel(axis: Axes, bins: ReliabilityBins, title: str, ece: float) -> None:
    width = np.diff(bins.edges)
    left = bins.edges[:-1]
    used = bins.count > 0
    axis.bar(left[used], bins.accuracy[used], width[used], align="edge", color="tab:blue",
             edgecolor="black", linewidth=0.5, label="accuracy")  # fmt: skip
    # The gap between accuracy and mean confidence, hatched, whichever is higher.
    low = np.minimum(bins.accuracy[used], bins.confidence[used])
    high = np.maximum(bins.accuracy[used], bins.confidence[used])
    axis.bar(left[used], high - low, width[used], bottom=low, align="edge", fill=False,
             hatch="///", edgecolor="tab:red", linewidth=0.5,
             label="gap to mean confidence")  # fmt: skip
    axis.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    for x, n in zip(left[used], bins.count[used], strict=True):
        axis.text(x + width[0] / 2, 1.03, str(n), ha="center", fontsize=6)
    axis.set(xlim=(0, 1), ylim=(0, 1.08), xlabel="confidence (max probability)",
             title=f"{title}\nECE {ece:.4f} (15 bins; numbers: images per bin)")  # fmt: skip
    axis.set_aspect("equal")


def reliability_figure(result: DigitsResult, path: Path) -> Path:
    """Reliability diagrams of MC dropout (server) and the deterministic network, side by side."""
    figure, axes = plt.subplots(1, 2, figsize=(10, 5), sharey=True)
    _reliability_panel(
        axes[0],
        result.mc.bins,
        f"MC dropout, T = {result.plan.num_samples} (server)",
        result.mc.ece,
    )
    _reliability_panel(
        axes[1], result.deterministic.bins, "deterministic (dropout off)", result.deterministic.ece
    )
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="upper left", fontsize=8)
    figure.suptitle(f"digits test set ({result.num_test} images)")
    return _save(figure, path)


def uncertainty_figure(result: DigitsResult, path: Path) -> Path:
    """Histograms of MC mutual information and deterministic 1 - max softmax per input set."""
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, scores, label in (
        (axes[0], result.mutual_information, "MC mutual information (nats)"),
        (axes[1], result.det_max_softmax, "deterministic 1 - max softmax"),
    ):
        top = max(float(v.max()) for v in scores.values())
        bins = np.linspace(0, max(top, 1e-6), 31)
        for name, values in scores.items():
            axis.hist(values, bins=bins, histtype="step", linewidth=1.5, density=True, label=name)
        axis.set(xlabel=label, ylabel="density", yscale="log")
    axes[1].legend(fontsize=8)
    figure.suptitle("digits: uncertainty scores of in-distribution and shifted inputs")
    return _save(figure, path)


def convergence_figure(result: ConvergenceResult, path: Path) -> Path:
    """Spread across repeats vs T on log-log axes, one panel per statistic, 1/sqrt(T) dashed."""
    figure, axes = plt.subplots(2, 2, figsize=(11, 8.5))
    for axis, stat in zip(axes.ravel(), result.statistics, strict=True):
        counts = np.asarray(stat.sample_counts, np.float64)
        for n, name in enumerate(stat.input_names):
            spread = stat.spread[:, n]
            ok = np.isfinite(spread) & (spread > 0)
            axis.plot(counts[ok], spread[ok], "o-", markersize=3, linewidth=1, label=name)
        worst = stat.worst()
        ok = np.isfinite(worst) & (worst > 0) & (counts >= 100)
        if ok.any():
            # the 1/sqrt(T) line through the worst input's spread at large T
            c = float(np.exp(np.mean(np.log(worst[ok]) + 0.5 * np.log(counts[ok]))))
            axis.plot(counts, c / np.sqrt(counts), "k--", linewidth=1, label="c / sqrt(T)")
        axis.axhline(stat.threshold, color="grey", linestyle=":", linewidth=1,
                     label=f"threshold {stat.threshold:g}")  # fmt: skip
        default = result.default_samples.get(stat.model)
        if default:
            axis.axvline(default, color="tab:red", linewidth=1, alpha=0.6,
                         label=f"default T = {default}")  # fmt: skip
        axis.set(xscale="log", yscale="log", xlabel="T (stochastic passes)",
                 ylabel=f"spread across {result.plan.repeats} repeats ({stat.unit})",
                 title=f"{stat.model}: {stat.statistic}")  # fmt: skip
        axis.grid(True, which="major", alpha=0.3)
        axis.legend(fontsize=7)
    figure.suptitle("Monte Carlo error of one request vs T (std across repeated requests)")
    figure.tight_layout()
    return _save(figure, path)


def boston_figure(result: BostonResult, path: Path) -> Path:
    """Per-split test RMSE and log-likelihood, with the paper's and the re-run's means."""
    from evaluation.boston import PAPER_LL, PAPER_RMSE, RERUN_LL, RERUN_RMSE  # noqa: PLC0415

    figure, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    index = [s.index for s in result.splits]
    for axis, values, ours, paper, rerun, label in (
        (axes[0], [s.rmse for s in result.splits], result.rmse, PAPER_RMSE, RERUN_RMSE, "RMSE"),
        (axes[1], [s.log_likelihood for s in result.splits], result.log_likelihood, PAPER_LL,
         RERUN_LL, "test log-likelihood"),
    ):  # fmt: skip
        axis.plot(index, values, "o", color="tab:blue", label="this evaluation, per split")
        axis.axhline(ours[0], color="tab:blue", label=f"ours {ours[0]:.2f} +- {ours[1]:.2f}")
        axis.axhline(paper[0], color="tab:orange", linestyle="--",
                     label=f"paper {paper[0]:.2f} +- {paper[1]:.2f}")  # fmt: skip
        axis.axhline(rerun[0], color="tab:green", linestyle=":",
                     label=f"2018 re-run {rerun[0]:.2f} +- {rerun[1]:.2f}")  # fmt: skip
        axis.set(xlabel="split", ylabel=label, xticks=index)
        axis.tick_params(axis="x", labelsize=7)
        axis.legend(fontsize=7)
    figure.suptitle(f"Boston housing, MC dropout, T = {result.plan.test_samples} (server)")
    figure.tight_layout()
    return _save(figure, path)
