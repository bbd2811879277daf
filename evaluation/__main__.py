"""``python -m evaluation [--quick]``: the whole evaluation, through a running server.

Stages::

    build the repository (in process: train, select, export)   boston, digits, housing
    -> start one server on it (127.0.0.1, free port)
    -> query: Boston test splits, digits sets, convergence repeats
    -> stop the server (always) -> figures + docs/evaluation.md

``--quick`` runs a reduced version (3 splits, few epochs, T = 1,000) for smoke testing and
writes it to a temporary folder, never to docs/.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

from evaluation import boston, convergence, digits, plots, report
from evaluation.common import ROOT, machine_description, quiet_export_logs, serving

log = logging.getLogger("evaluation")

T = TypeVar("T")

DOCS = ROOT / "docs"
REPORT_NAME = "evaluation.md"
FIGURE_FOLDER = "evaluation"
#: The server's own limits suffice: the largest request, a Boston split (51 rows x T = 10,000
#: samples returned, 4 MB), is below --max-row-samples (2,000,000) and --max-returned-samples
#: (4,000,000). Threads are pinned so the study does not depend on the caller's environment.
SERVER_FLAGS = ("--intra-op-threads", "2", "--compute-workers", "1")


@dataclass(frozen=True)
class Plans:
    """The settings of every stage."""

    boston: boston.BostonPlan
    digits: digits.DigitsPlan
    convergence: convergence.ConvergencePlan


FULL = Plans(boston.BostonPlan(), digits.DigitsPlan(), convergence.ConvergencePlan())
QUICK = Plans(
    boston.BostonPlan(num_splits=3, epochs=40, validation_samples=100, test_samples=1000),
    digits.DigitsPlan(epochs=3, sweep_samples=(10, 100, 1000)),
    convergence.ConvergencePlan(
        sample_counts=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000), repeats=5
    ),
)


class Stopwatch:
    """Wall time per named stage, logged as each ends."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.stages: dict[str, float] = {}
        self.load_at_start = os.getloadavg()[0]

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        log.info("%s ...", name)
        started = time.perf_counter()
        yield
        self.stages[name] = time.perf_counter() - started
        log.info("%s done in %.1f s", name, self.stages[name])

    def timed(self, name: str, function: Callable[[], T]) -> T:
        with self.stage(name):
            return function()

    @property
    def elapsed_s(self) -> float:
        return time.perf_counter() - self.started

    @staticmethod
    def cpu_s() -> float:
        """CPU time of this process and its finished children (the server, once stopped)."""
        own = resource.getrusage(resource.RUSAGE_SELF)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m evaluation",
        description="MC dropout evaluation through a running server: Boston (Gal & "
        "Ghahramani protocol), digits calibration and OOD detection, convergence with T.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="reduced smoke run (about 2 minutes), written to a temporary folder",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help=f"folder for {REPORT_NAME} and {FIGURE_FOLDER}/*.png "
        "(default: docs/, or a temporary folder with --quick)",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="keep the model repository and server log here (default: a temporary folder)",
    )
    return parser


def run(plans: Plans, output: Path, workdir: Path, command: str, *, quick: bool) -> Path:
    """Runs every stage; returns the report's path."""
    repository = workdir / "repository"
    if repository.exists() and any(repository.iterdir()):
        # export_model would add versions next to an earlier run's, and the server would
        # serve a mix of both runs' models.
        raise SystemExit(f"{repository} is not empty: give an empty or new --workdir")
    repository.mkdir(parents=True, exist_ok=True)
    clock = Stopwatch()
    with clock.stage("build: Boston selection, fit and export"):
        boston_ready = boston.prepare(plans.boston, repository)
    with clock.stage("build: digits training and export"):
        digits_ready = digits.prepare(plans.digits, repository, workdir)
    with clock.stage("build: housing example and convergence inputs"):
        convergence_ready = convergence.prepare(plans.convergence, repository, digits_ready)
    expected = {
        *boston_ready.model_names,
        digits_ready.full.name,
        digits_ready.holdout.name,
        convergence.HOUSING_MODEL,
    }
    log.info("serve: starting the server (it checks every model version as it loads) ...")
    starting = time.perf_counter()
    with serving(repository, workdir, expected, SERVER_FLAGS) as client:
        clock.stages["serve: server start-up"] = time.perf_counter() - starting
        boston_result = clock.timed(
            "serve: Boston test", lambda: boston.evaluate(boston_ready, client)
        )
        digits_result = clock.timed("serve: digits", lambda: digits.evaluate(digits_ready, client))
        convergence_result = clock.timed(
            "serve: convergence", lambda: convergence.evaluate(convergence_ready, client)
        )
    figure_folder = output / FIGURE_FOLDER
    with clock.stage("figures and report"):
        figures = {
            "boston": plots.boston_figure(boston_result, figure_folder / "boston.png"),
            "reliability": plots.reliability_figure(
                digits_result, figure_folder / "reliability_digits.png"
            ),
            "uncertainty": plots.uncertainty_figure(
                digits_result, figure_folder / "uncertainty_digits.png"
            ),
            "convergence": plots.convergence_figure(
                convergence_result, figure_folder / "convergence.png"
            ),
        }
    context = report.ReportContext(
        command=command,
        machine=machine_description(),
        elapsed_s=clock.elapsed_s,
        cpu_s=clock.cpu_s(),
        load_average=(clock.load_at_start, os.getloadavg()[0]),
        stage_s=dict(clock.stages),
        figures={k: str(p.relative_to(output)) for k, p in figures.items()},
        quick=quick,
    )
    text = report.render(context, boston_result, digits_result, convergence_result)
    path = report.write(text, output / REPORT_NAME)
    log.info(
        "Boston RMSE %.2f ± %.2f, LL %.2f ± %.2f; digits MC accuracy %.4f, ECE %.4f",
        *boston_result.rmse, *boston_result.log_likelihood,
        digits_result.mc.accuracy, digits_result.mc.ece,
    )  # fmt: skip
    log.info("wrote %s in %.0f s", path, clock.elapsed_s)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the evaluation; returns the exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    quiet_export_logs()
    # Small networks: one thread per process is faster than two fighting over two cores, and
    # the server (a separate process) gets the other core while it answers.
    torch.set_num_threads(1)
    plans = QUICK if args.quick else FULL
    command = "python -m evaluation" + (" --quick" if args.quick else "")
    output = args.output
    if output is None:
        # a quick run's report is kept (outside the temporary workdir) but never in docs/
        output = Path(tempfile.mkdtemp(prefix="mcd-eval-quick-")) if args.quick else DOCS
    with tempfile.TemporaryDirectory(prefix="mcd-eval-") as temporary:
        workdir = args.workdir or Path(temporary)
        workdir.mkdir(parents=True, exist_ok=True)
        path = run(plans, output, workdir, command, quick=args.quick)
    sys.stderr.write(f"report: {path}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
