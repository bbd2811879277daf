"""Architectures users serve, with random weights and no download, for tests and benchmarks.

Each ``ZooEntry`` gives a model builder (seeded), example inputs (seeded) and the keyword
arguments of ``export_model`` that describe its serving contract (names, semantics, dynamic
axes), so that::

    entry = ZOO["bert"]
    export_model(entry.build(), entry.example_inputs(), repository=..., name=entry.name,
                 **entry.export_args)

exports it. The entries cover the ways real architectures trip MC dropout export: dropout
modules bypassed by fused attention (BERT, ViT), PyTorch's fused inference fast path
(``nn.TransformerEncoder``), recurrent layers (LSTM), convolutional nets with BatchNorm and
stochastic depth (EfficientNet, MobileNet), heteroscedastic and mixed (class + regression)
heads, and a dynamic sequence axis (BERT).

torchvision, timm and transformers are optional (the ``dev`` extra pins them); an entry's
``requires`` names what it needs and ``ZooEntry.available`` says whether it is installed.
Import torchvision only through ``import_torchvision`` (timm and transformers import it too,
so their builders call it first).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType, ModuleType
from typing import Any

import torch
from torch import nn

__all__ = ["ZOO", "BertClassifier", "ZooEntry", "calibrate_batchnorm", "import_torchvision"]

# torchvision's two C++ operator schemas its pure-Python modules register fake kernels for at
# import time. PyPI's torchvision wheel is built against CUDA torch; beside the CPU torch its
# extension library does not load, so these operators do not exist and ``import torchvision``
# fails ("operator torchvision::nms does not exist").
_TORCHVISION_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
# The library that defines them must stay alive as long as the process: dropping it
# would unregister the schemas.
_torchvision_library: list[torch.library.Library] = []


def _forget_torchvision() -> None:
    for module in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[module]


def import_torchvision() -> ModuleType:
    """Import torchvision, defining its ``nms`` / ``qnms`` schemas first when they are missing.

    Harmless when torchvision's C++ extension loads (its own operators are used and nothing is
    defined here) and idempotent. Only the models (pure Python) are needed: detection ops
    (nms) keep no kernel without the extension.

    Returns:
        The torchvision module.

    Raises:
        ImportError: torchvision is not installed.
        RuntimeError: it fails to import for another reason.
    """
    if "torchvision" in sys.modules:
        return sys.modules["torchvision"]
    try:
        return importlib.import_module("torchvision")
    except RuntimeError as error:
        if "torchvision::" not in str(error):
            raise
    # The failed import left half-initialised modules behind; start again once the schemas
    # it needs exist.
    _forget_torchvision()
    if not _torchvision_library:
        library = torch.library.Library("torchvision", "DEF")  # type: ignore[no-untyped-call]
        for schema in _TORCHVISION_SCHEMAS.values():
            library.define(schema)  # type: ignore[no-untyped-call]
        _torchvision_library.append(library)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return importlib.import_module("torchvision")


@dataclass(frozen=True)
class ZooEntry:
    """One architecture.

    Attributes:
        name: the entry's (and exported model's) name.
        description: what it is, and what it exercises.
        build: returns the model with seeded random weights, in training mode as a user
            would hand it over.
        example_inputs: returns the seeded example inputs, one tensor per model input.
        export_args: keyword arguments of ``export_model`` besides the model, inputs,
            repository, name and verification settings.
        requires: packages beyond torch that ``build`` imports.
        dropout_not_run: how many dropout modules with p > 0 are known not to run in the
            MC-mode forward, where that number does not depend on the environment; None
            otherwise.
    """

    name: str
    description: str
    build: Callable[[], nn.Module]
    example_inputs: Callable[[], tuple[torch.Tensor, ...]]
    export_args: Mapping[str, Any] = field(default_factory=dict)
    requires: tuple[str, ...] = ()
    dropout_not_run: int | None = None

    @property
    def available(self) -> bool:
        """Whether every package in ``requires`` is installed."""
        return all(importlib.util.find_spec(package) is not None for package in self.requires)


def _seeded(seed: int, make: Callable[[], nn.Module]) -> nn.Module:
    """``make()`` under its own seed, leaving the caller's random state alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = make()
    model.train()
    return model


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def calibrate_batchnorm(model: nn.Module, batches: Sequence[torch.Tensor]) -> nn.Module:
    """Set every BatchNorm's running statistics to those of ``model`` on ``batches`` (a
    cumulative average), as after training; other modules are untouched.

    At initialisation (running mean 0, variance 1) deep convolutional nets such as
    EfficientNet-B0 shrink their activations block after block in eval mode: their logits
    come out around 1e-13, so every MC sample looks deterministic and verification would
    compare nothing. Statistics measured on data, as after training, keep the activations
    near unit scale.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over the batches
    model.train()
    with torch.no_grad():
        for batch in batches:
            model(batch)
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum
    return model


# ---- BERT (Hugging Face transformers) ----------------------------------------------------

BERT_VOCAB = 100
BERT_SEQUENCE = 16
BERT_MAX_SEQUENCE = 64


class BertClassifier(nn.Module):
    """``BertForSequenceClassification`` returning its logits tensor (not a ModelOutput)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, S) int64 token ids and mask -> (B, C) logits."""
        logits: torch.Tensor = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        return logits


def _bert() -> nn.Module:
    import_torchvision()
    transformers = importlib.import_module("transformers")
    config = transformers.BertConfig(
        vocab_size=BERT_VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=BERT_MAX_SEQUENCE,
        num_labels=3,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        attn_implementation="eager",
    )
    return BertClassifier(transformers.BertForSequenceClassification(config))


def _bert_inputs() -> tuple[torch.Tensor, ...]:
    ids = torch.randint(0, BERT_VOCAB, (4, BERT_SEQUENCE), generator=_generator(11))
    mask = torch.ones(4, BERT_SEQUENCE, dtype=torch.int64)
    mask[1, 12:] = 0  # a padded row
    mask[3, 9:] = 0
    return ids, mask


# ---- ViT (timm) --------------------------------------------------------------------------


def _vit() -> nn.Module:
    import_torchvision()
    vision_transformer = importlib.import_module("timm.models.vision_transformer")
    model: nn.Module = vision_transformer.VisionTransformer(
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
        mlp_ratio=2.0,
        num_classes=5,
        drop_rate=0.1,
        pos_drop_rate=0.1,
        attn_drop_rate=0.1,
        proj_drop_rate=0.1,
    )
    return model


def _image_inputs(rows: int, size: int, seed: int) -> tuple[torch.Tensor, ...]:
    return (torch.randn(rows, 3, size, size, generator=_generator(seed)),)


# ---- nn.TransformerEncoder ---------------------------------------------------------------

TOKENS = 50


class TransformerClassifier(nn.Module):
    """Embedding, 2 x nn.TransformerEncoderLayer, mean pool, linear head.

    Its encoder layers take PyTorch's fused inference fast path in eval mode without
    gradients, which skips their dropout: export and reference must both turn it off. All
    its dropout is inside the encoder, so a reference on the fast path has no variance.
    """

    def __init__(self, classes: int = 4, width: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(TOKENS, width)
        layer = nn.TransformerEncoderLayer(
            width, nhead=4, dim_feedforward=64, dropout=0.1, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(width, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, S) int64 tokens -> (B, C) logits."""
        hidden = self.encoder(self.embed(tokens)).mean(dim=1)
        logits: torch.Tensor = self.head(hidden)
        return logits


def _token_inputs(rows: int, length: int, seed: int) -> tuple[torch.Tensor, ...]:
    return (torch.randint(0, TOKENS, (rows, length), generator=_generator(seed)),)


# ---- LSTM ----------------------------------------------------------------------------------


class LstmRegressor(nn.Module):
    """Embedding, Dropout, LSTM, Dropout on the last hidden state, Linear: (B, S) -> (B, 1)."""

    def __init__(self, width: int = 16, hidden: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(TOKENS, width)
        self.drop_in = nn.Dropout(0.2)
        self.lstm = nn.LSTM(width, hidden, batch_first=True)
        self.drop_out = nn.Dropout(0.2)
        self.head = nn.Linear(hidden, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, S) int64 tokens -> (B, 1) values."""
        sequence, _ = self.lstm(self.drop_in(self.embed(tokens)))
        value: torch.Tensor = self.head(self.drop_out(sequence[:, -1]))
        return value


# ---- torchvision ---------------------------------------------------------------------------


def _image_batches(size: int) -> list[torch.Tensor]:
    # Drawn from the global generator, which _seeded has seeded.
    return [torch.randn(8, 3, size, size) for _ in range(3)]


def _efficientnet_b0() -> nn.Module:
    model: nn.Module = import_torchvision().models.efficientnet_b0(num_classes=10)
    return calibrate_batchnorm(model, _image_batches(64))


def _mobilenet_v3_small() -> nn.Module:
    model: nn.Module = import_torchvision().models.mobilenet_v3_small(num_classes=10)
    return calibrate_batchnorm(model, _image_batches(64))


# ---- heads -------------------------------------------------------------------------------


class HeteroscedasticRegressor(nn.Module):
    """MLP with dropout; returns (mean, log-variance), each (B, 2)."""

    def __init__(self, features: int = 8, targets: int = 2) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(features, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 32), nn.ReLU()
        )
        self.drop = nn.Dropout(0.2)
        self.mean = nn.Linear(32, targets)
        self.log_variance = nn.Linear(32, targets)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, F) -> ((B, T) mean, (B, T) log-variance)."""
        hidden = self.drop(self.body(x))
        return self.mean(hidden), self.log_variance(hidden)


class TwoHeadModel(nn.Module):
    """A shared trunk with dropout, a classification head and a regression head."""

    def __init__(self, features: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Linear(features, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.2)
        )
        self.classify = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Dropout(0.1))
        self.logits = nn.Linear(16, classes)
        self.value = nn.Linear(32, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, F) -> ((B, C) logits, (B, 1) values)."""
        hidden = self.trunk(x)
        return self.logits(self.classify(hidden)), self.value(hidden)


def _table_inputs(rows: int, features: int, seed: int) -> tuple[torch.Tensor, ...]:
    return (torch.randn(rows, features, generator=_generator(seed)),)


_ENTRIES = (
    ZooEntry(
        name="bert",
        description="Hugging Face BertForSequenceClassification, tiny config, eager attention, "
        "int64 input_ids + attention_mask, dynamic sequence axis (16 in the example, up to 64); "
        "its 2 attention-probability dropout modules do not run in MC mode",
        build=lambda: _seeded(1, _bert),
        example_inputs=_bert_inputs,
        export_args=MappingProxyType(
            {
                "task": "classification",
                "input_names": ["input_ids", "attention_mask"],
                "output_names": ["logits"],
                "dynamic_axes": {"input_ids": {1: "sequence"}, "attention_mask": {1: "sequence"}},
                "axis_max": {"sequence": BERT_MAX_SEQUENCE},
            }
        ),
        requires=("transformers", "torchvision"),
        dropout_not_run=2,
    ),
    ZooEntry(
        name="vit",
        description="timm VisionTransformer, tiny (32x32 images, patch 8, width 32, depth 2), "
        "drop_rate / pos_drop_rate / attn_drop_rate / proj_drop_rate 0.1; with fused "
        "attention (timm's default) its attn_drop modules do not run in MC mode",
        build=lambda: _seeded(2, _vit),
        example_inputs=lambda: _image_inputs(4, 32, 12),
        export_args=MappingProxyType(
            {"task": "classification", "input_names": ["image"], "output_names": ["logits"]}
        ),
        requires=("timm", "torchvision"),
    ),
    ZooEntry(
        name="transformer_encoder",
        description="nn.TransformerEncoder classifier (2 layers, width 32, 12 tokens): PyTorch's "
        "fused inference fast path would skip its dropout",
        build=lambda: _seeded(3, TransformerClassifier),
        example_inputs=lambda: _token_inputs(4, 12, 13),
        export_args=MappingProxyType(
            {"task": "classification", "input_names": ["tokens"], "output_names": ["logits"]}
        ),
        dropout_not_run=0,
    ),
    ZooEntry(
        name="lstm",
        description="LSTM regressor: Embedding, Dropout, LSTM, Dropout, Linear (10 tokens)",
        build=lambda: _seeded(4, LstmRegressor),
        example_inputs=lambda: _token_inputs(4, 10, 14),
        export_args=MappingProxyType(
            {"task": "regression", "input_names": ["tokens"], "output_names": ["value"]}
        ),
        dropout_not_run=0,
    ),
    ZooEntry(
        name="efficientnet_b0",
        description="torchvision efficientnet_b0, 3x64x64 images, 10 classes (BatchNorm, "
        "stochastic depth, dropout before the classifier); BatchNorm statistics measured on "
        "random images",
        build=lambda: _seeded(5, _efficientnet_b0),
        example_inputs=lambda: _image_inputs(2, 64, 15),
        export_args=MappingProxyType(
            {"task": "classification", "input_names": ["image"], "output_names": ["logits"]}
        ),
        requires=("torchvision",),
        dropout_not_run=0,
    ),
    ZooEntry(
        name="mobilenet_v3_small",
        description="torchvision mobilenet_v3_small, 3x64x64 images, 10 classes; BatchNorm "
        "statistics measured on random images",
        build=lambda: _seeded(6, _mobilenet_v3_small),
        example_inputs=lambda: _image_inputs(2, 64, 16),
        export_args=MappingProxyType(
            {"task": "classification", "input_names": ["image"], "output_names": ["logits"]}
        ),
        requires=("torchvision",),
        dropout_not_run=0,
    ),
    ZooEntry(
        name="heteroscedastic",
        description="MLP regressor with a (mean, log-variance) head",
        build=lambda: _seeded(7, HeteroscedasticRegressor),
        example_inputs=lambda: _table_inputs(4, 8, 17),
        export_args=MappingProxyType(
            {
                "task": "regression",
                "input_names": ["features"],
                "output_names": ["mean", "log_variance"],
                "output_semantics": ["values", "log_variance"],
                "variance_of": {"log_variance": "mean"},
            }
        ),
        dropout_not_run=0,
    ),
    ZooEntry(
        name="two_head",
        description="shared trunk (BatchNorm, dropout) with class logits and a regression value",
        build=lambda: _seeded(8, TwoHeadModel),
        example_inputs=lambda: _table_inputs(4, 8, 18),
        export_args=MappingProxyType(
            {
                "input_names": ["features"],
                "output_names": ["logits", "value"],
                "output_semantics": ["logits", "values"],
                "output_labels": {"logits": ["low", "mid", "high"]},
            }
        ),
        dropout_not_run=0,
    ),
)

#: The architectures, by name.
ZOO: Mapping[str, ZooEntry] = MappingProxyType({entry.name: entry for entry in _ENTRIES})
