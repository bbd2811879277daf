"""Realistic benchmark models: ImageNet-sized CNNs, a ViT and BERTs, with random (seeded) weights.

Speed does not depend on training, so every model is built from its library's own code with
seeded random weights and nothing is downloaded. BatchNorm running statistics are measured on
random inputs (as ``export/zoo.py`` does), so that deep CNNs keep their activations near unit
scale instead of shrinking them to ~0 through dozens of blocks.

Two families, by where their first dropout is:

* ``head``: dropout only in the classifier, so almost all the work is deterministic and runs
  once per row. MobileNetV3-Small and EfficientNet-B0 (torchvision, their own classifier
  dropout, 1000 classes; 3x128x128 on the CPU) and ResNet-50 with its ``fc`` replaced by
  Dropout(0.5) + Linear(2048, 1000) (3x224x224, on the GPU).
* ``everywhere``: dropout from the first layers on (embeddings, attention probabilities,
  projections, MLPs, head), so every sample runs the whole model. A small BERT (4 layers, width
  256, sequence 128) on the CPU; ViT-B/16 (timm, 224) and BERT-base (sequence 128) on the GPU.

The attention-probability dropout of both transformer libraries is bypassed in MC mode by
their fused or eager kernels (they pass ``dropout_p`` only while the attention module itself
trains): here timm's attention runs its unfused path (``fused_attn = False``) and BERT an eager
attention registered with transformers' ``AttentionInterface`` that calls the module's own
``nn.Dropout``, so that dropout runs, is exported, and is sampled "everywhere".

Each model has a ``full`` size (the benchmark's) and a ``smoke`` size (the same code, tiny
dimensions, for tests and ``--smoke`` runs). :func:`prepare_real` exports them with
``export.export_model`` (``precision="fp32"`` or ``"fp16"``) into a model repository, and
reuses what an earlier run exported there from the same weights.
"""

from __future__ import annotations

import importlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from export.api import export_model
from export.errors import VerificationError
from export.precision import Precision
from export.publish import METADATA_FILE, MODEL_FILE, weights_sha256
from export.zoo import BertClassifier, calibrate_batchnorm, import_torchvision
from service.repository import VersionSource, load_version

__all__ = [
    "REAL_MODELS",
    "Family",
    "PreparedReal",
    "RealSpec",
    "Size",
    "model_name",
    "prepare_real",
]

log = logging.getLogger(__name__)

Family = Literal["head", "everywhere"]
Size = Literal["full", "smoke"]
Inputs = dict[str, npt.NDArray[Any]]

OUTPUT_NAME = "logits"
VERSION = 1
#: Exports tried before a failed statistical verification stops the run (a correct export
#: fails it with a small, stated probability; a broken one fails every attempt).
EXPORT_ATTEMPTS = 3
#: MC samples per side of export verification, and rows verified: the export's statistical
#: check (its false-failure probability stays export_model's), kept short for models of up to
#: ~20 GFLOP per row: the exports of the CPU models take about 2.5 minutes on 2 cores.
VERIFY_SAMPLES = 200
VERIFY_ROWS = 1
#: The registered name of the eager attention whose probability dropout runs in MC mode.
MC_EAGER_ATTENTION = "mcdropout_eager"


@dataclass(frozen=True)
class Split:
    """A head-family model cut before its first dropout, for the hand-written PyTorch MC.

    Attributes:
        backbone: (B, ...) inputs -> (B, F) features: everything before the first dropout.
        head: (N, F) -> (N, C) logits: the first dropout and everything after it.
    """

    backbone: Callable[[torch.Tensor], torch.Tensor]
    head: nn.Module


@dataclass(frozen=True)
class RealSpec:
    """One realistic model.

    Attributes:
        key: short name (result keys, folder names), e.g. "resnet50_head".
        title: one line for the report.
        family: "head" (dropout only in the classifier) or "everywhere".
        build: (size) -> the model with seeded random weights, in training mode as a user
            would hand it over (BatchNorm statistics already measured).
        inputs: (size, B rows, seed) -> the model's inputs, one (B, ...) array per input.
        input_names: the graph's inputs, in the model's argument order.
        split: the cut of a head-family model (None for "everywhere").
        sizes: per size, the dimensions in words (for the report).
        classes: number of classes of the logits.
        requires: packages beyond torch its builder imports.
    """

    key: str
    title: str
    family: Family
    build: Callable[[Size], nn.Module]
    inputs: Callable[[Size, int, int], Inputs]
    input_names: tuple[str, ...]
    split: Callable[[nn.Module], Split] | None
    sizes: Mapping[Size, str]
    classes: int = 1000
    requires: tuple[str, ...] = ()

    def tensors(self, size: Size, num_rows: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
        """The inputs as CPU tensors, in argument order."""
        arrays = self.inputs(size, num_rows, seed)
        return tuple(torch.from_numpy(arrays[name]) for name in self.input_names)


# ---------------------------------------------------------------- building blocks


def _seeded(seed: int, make: Callable[[], nn.Module]) -> nn.Module:
    """``make()`` under its own seed (the caller's random state is left alone), in train mode.

    On one thread: BatchNorm calibration sums in an order that depends on the thread count,
    and the same weights whatever the caller's settings let a later run reuse an export
    (``prepare_real`` compares weight hashes).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = make()
    finally:
        torch.set_num_threads(threads)
    model.train()
    return model


def _images(size: Size, full_px: int, smoke_px: int, rows: int, seed: int) -> Inputs:
    side = full_px if size == "full" else smoke_px
    rng = np.random.default_rng(seed)
    return {"image": rng.standard_normal((rows, 3, side, side)).astype(np.float32)}


def _calibration(side: int, batches: int = 3, rows: int = 8) -> list[torch.Tensor]:
    # Drawn from the global generator, which _seeded has seeded.
    return [torch.randn(rows, 3, side, side) for _ in range(batches)]


# ---------------------------------------------------------------- torchvision CNNs

CPU_IMAGE_PX = 128
GPU_IMAGE_PX = 224
SMOKE_IMAGE_PX = 32


def _mobilenet_v3_small(size: Size) -> nn.Module:
    def make() -> nn.Module:
        models = import_torchvision().models
        width = 1.0 if size == "full" else 0.25
        model: nn.Module = models.mobilenet_v3_small(num_classes=1000, width_mult=width)
        side = CPU_IMAGE_PX if size == "full" else SMOKE_IMAGE_PX
        return calibrate_batchnorm(model, _calibration(side))

    return _seeded(21, make)


def _mobilenet_split(model: nn.Module) -> Split:
    """features -> avgpool -> flatten -> Linear -> Hardswish | Dropout -> Linear."""
    features, pool, classifier = (
        model.get_submodule(n) for n in ("features", "avgpool", "classifier")
    )
    assert isinstance(classifier, nn.Sequential)

    def backbone(x: torch.Tensor) -> torch.Tensor:
        hidden: torch.Tensor = classifier[1](classifier[0](torch.flatten(pool(features(x)), 1)))
        return hidden

    return Split(backbone, classifier[2:])


def _efficientnet_b0(size: Size) -> nn.Module:
    def make() -> nn.Module:
        models = import_torchvision().models
        if size == "full":
            model: nn.Module = models.efficientnet_b0(num_classes=1000)
        else:  # the same EfficientNet code, a quarter of the width and depth
            efficientnet = importlib.import_module("torchvision.models.efficientnet")
            blocks, last_channel = efficientnet._efficientnet_conf(
                "efficientnet_b0", width_mult=0.25, depth_mult=0.25
            )
            model = efficientnet.EfficientNet(
                blocks, 0.2, last_channel=last_channel, num_classes=1000
            )
        side = CPU_IMAGE_PX if size == "full" else SMOKE_IMAGE_PX
        return calibrate_batchnorm(model, _calibration(side))

    return _seeded(22, make)


def _pooled_split(model: nn.Module) -> Split:
    """features -> avgpool -> flatten | classifier (Dropout -> Linear): EfficientNet."""
    features, pool, classifier = (
        model.get_submodule(n) for n in ("features", "avgpool", "classifier")
    )

    def backbone(x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(pool(features(x)), 1)

    return Split(backbone, classifier)


def _resnet50_head(size: Size) -> nn.Module:
    def make() -> nn.Module:
        models = import_torchvision().models
        if size == "full":
            model: nn.Module = models.resnet50()
        else:  # the same Bottleneck ResNet, one block per stage, a quarter of the width
            resnet = importlib.import_module("torchvision.models.resnet")
            model = resnet.ResNet(resnet.Bottleneck, [1, 1, 1, 1], width_per_group=16)
        fc = model.get_submodule("fc")
        assert isinstance(fc, nn.Linear)
        model.fc = nn.Sequential(nn.Dropout(0.5), nn.Linear(fc.in_features, 1000))
        side = GPU_IMAGE_PX if size == "full" else SMOKE_IMAGE_PX
        return calibrate_batchnorm(model, _calibration(side))

    return _seeded(23, make)


def _resnet_split(model: nn.Module) -> Split:
    """conv1 ... layer4 -> avgpool -> flatten | fc (Dropout(0.5) -> Linear)."""
    names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool")
    stem = [model.get_submodule(name) for name in names]

    def backbone(x: torch.Tensor) -> torch.Tensor:
        for module in stem:
            x = module(x)
        return torch.flatten(x, 1)

    return Split(backbone, model.get_submodule("fc"))


# ---------------------------------------------------------------- ViT (timm)


def _vit_b16(size: Size) -> nn.Module:
    def make() -> nn.Module:
        import_torchvision()
        vision_transformer = importlib.import_module("timm.models.vision_transformer")
        dims: dict[str, Any] = (
            {
                "img_size": GPU_IMAGE_PX,
                "patch_size": 16,
                "embed_dim": 768,
                "depth": 12,
                "num_heads": 12,
            }
            if size == "full"
            else {
                "img_size": SMOKE_IMAGE_PX,
                "patch_size": 8,
                "embed_dim": 32,
                "depth": 2,
                "num_heads": 2,
            }
        )
        model: nn.Module = vision_transformer.VisionTransformer(
            **dims,
            num_classes=1000,
            drop_rate=0.1,
            pos_drop_rate=0.1,
            attn_drop_rate=0.1,
            proj_drop_rate=0.1,
        )
        # The unfused attention calls attn_drop as a module, so it samples in MC mode.
        for module in model.modules():
            if "fused_attn" in vars(module):
                vars(module)["fused_attn"] = False
        return model

    return _seeded(24, make)


# ---------------------------------------------------------------- BERT (transformers)

BERT_SEQUENCE = 128
SMOKE_BERT_SEQUENCE = 16
BERT_VOCAB = 30522
SMOKE_BERT_VOCAB = 100
BERT_CLASSES = 2


def _mc_eager_attention(  # noqa: PLR0917 (transformers' attention interface)
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' eager attention, with the attention probabilities dropped by the
    module's own ``nn.Dropout`` (it samples in MC mode; the eager kernel's functional dropout
    only does while the whole attention module trains)."""
    del dropout, kwargs  # the module's Dropout decides, in PyTorch and in the exported graph
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = module.get_submodule("dropout")(nn.functional.softmax(weights, dim=-1))
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return output, weights


def register_mc_eager_attention() -> None:
    """Register :func:`_mc_eager_attention` (and eager masks) under
    :data:`MC_EAGER_ATTENTION` with transformers (idempotent)."""
    import_torchvision()
    modeling_utils = importlib.import_module("transformers.modeling_utils")
    masking_utils = importlib.import_module("transformers.masking_utils")
    modeling_utils.AttentionInterface.register(MC_EAGER_ATTENTION, _mc_eager_attention)
    masking_utils.AttentionMaskInterface.register(MC_EAGER_ATTENTION, masking_utils.eager_mask)


def _bert(layers: int, width: int, heads: int) -> Callable[[Size], nn.Module]:
    def build(size: Size) -> nn.Module:
        def make() -> nn.Module:
            register_mc_eager_attention()
            transformers = importlib.import_module("transformers")
            full = size == "full"
            config = transformers.BertConfig(
                vocab_size=BERT_VOCAB if full else SMOKE_BERT_VOCAB,
                hidden_size=width if full else 32,
                num_hidden_layers=layers if full else 2,
                num_attention_heads=heads if full else 2,
                intermediate_size=4 * width if full else 64,
                max_position_embeddings=512 if full else SMOKE_BERT_SEQUENCE,
                num_labels=BERT_CLASSES,
                hidden_dropout_prob=0.1,
                attention_probs_dropout_prob=0.1,
                attn_implementation=MC_EAGER_ATTENTION,
            )
            return BertClassifier(transformers.BertForSequenceClassification(config))

        return _seeded(25 + layers, make)

    return build


def _tokens(size: Size, rows: int, seed: int) -> Inputs:
    full = size == "full"
    length = BERT_SEQUENCE if full else SMOKE_BERT_SEQUENCE
    vocab = BERT_VOCAB if full else SMOKE_BERT_VOCAB
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (rows, length), dtype=np.int64)
    return {"input_ids": ids, "attention_mask": np.ones((rows, length), dtype=np.int64)}


# ---------------------------------------------------------------- the registry


def _cpu_images(size: Size, rows: int, seed: int) -> Inputs:
    return _images(size, CPU_IMAGE_PX, SMOKE_IMAGE_PX, rows, seed)


def _gpu_images(size: Size, rows: int, seed: int) -> Inputs:
    return _images(size, GPU_IMAGE_PX, SMOKE_IMAGE_PX, rows, seed)


_VISION = ("torchvision",)
_TOKENS = ("input_ids", "attention_mask")

REAL_MODELS: Mapping[str, RealSpec] = {
    spec.key: spec
    for spec in (
        RealSpec(
            key="mobilenet_v3_small",
            title="MobileNetV3-Small (torchvision), 1000 classes, its classifier's Dropout(0.2)",
            family="head",
            build=_mobilenet_v3_small,
            inputs=_cpu_images,
            input_names=("image",),
            split=_mobilenet_split,
            sizes={"full": "3x128x128", "smoke": "3x32x32, width x0.25"},
            requires=_VISION,
        ),
        RealSpec(
            key="efficientnet_b0",
            title="EfficientNet-B0 (torchvision), 1000 classes, its classifier's Dropout(0.2)",
            family="head",
            build=_efficientnet_b0,
            inputs=_cpu_images,
            input_names=("image",),
            split=_pooled_split,
            sizes={"full": "3x128x128", "smoke": "3x32x32, width and depth x0.25"},
            requires=_VISION,
        ),
        RealSpec(
            key="bert_small",
            title="small BERT (transformers, 4 layers, width 256, 4 heads), 2 classes, "
            "Dropout(0.1) everywhere (embeddings, attention probabilities, projections, head)",
            family="everywhere",
            build=_bert(4, 256, 4),
            inputs=_tokens,
            input_names=_TOKENS,
            split=None,
            sizes={"full": "sequence 128", "smoke": "sequence 16, 2 layers, width 32"},
            classes=BERT_CLASSES,
            requires=("transformers", "torchvision"),
        ),
        RealSpec(
            key="resnet50_head",
            title="ResNet-50 (torchvision) with fc = Dropout(0.5) + Linear(2048, 1000)",
            family="head",
            build=_resnet50_head,
            inputs=_gpu_images,
            input_names=("image",),
            split=_resnet_split,
            sizes={"full": "3x224x224", "smoke": "3x32x32, 1 block per stage, width x0.25"},
            requires=_VISION,
        ),
        RealSpec(
            key="vit_b16",
            title="ViT-B/16 (timm), 1000 classes, Dropout(0.1) everywhere (positions, "
            "attention probabilities, projections, MLPs, head)",
            family="everywhere",
            build=_vit_b16,
            inputs=_gpu_images,
            input_names=("image",),
            split=None,
            sizes={"full": "3x224x224", "smoke": "3x32x32, patch 8, 2 layers, width 32"},
            requires=("timm", "torchvision"),
        ),
        RealSpec(
            key="bert_base",
            title="BERT-base (transformers, 12 layers, width 768, 12 heads), 2 classes, "
            "Dropout(0.1) everywhere (embeddings, attention probabilities, projections, head)",
            family="everywhere",
            build=_bert(12, 768, 12),
            inputs=_tokens,
            input_names=_TOKENS,
            split=None,
            sizes={"full": "sequence 128", "smoke": "sequence 16, 2 layers, width 32"},
            classes=BERT_CLASSES,
            requires=("transformers", "torchvision"),
        ),
    )
}


def model_name(key: str, precision: Precision) -> str:
    """The exported model's name: the key, with ``_fp16`` for a half-precision export."""
    return key if precision == "fp32" else f"{key}_{precision}"


# ---------------------------------------------------------------- export and reuse


@dataclass(frozen=True)
class PreparedReal:
    """A realistic model exported into a repository, and its PyTorch module.

    Attributes:
        spec: the model definition.
        size: "full" or "smoke".
        precision: the export's precision.
        model: the PyTorch module with the exported weights, in training mode (the anchors
            put copies in MC or eval mode).
        source: the published version, as the server loads it.
        export_s: seconds the export took (0 when reused from an earlier run).
    """

    spec: RealSpec
    size: Size
    precision: Precision
    model: nn.Module
    source: VersionSource
    export_s: float

    @property
    def name(self) -> str:
        return model_name(self.spec.key, self.precision)

    def inputs(self, num_rows: int, seed: int = 0) -> Inputs:
        return self.spec.inputs(self.size, num_rows, seed)


def _export(
    spec: RealSpec,
    model: nn.Module,
    *,
    size: Size,
    precision: Precision,
    repository: Path,
    seed: int,
) -> float:
    """export_model, retried when the statistical verification fails by chance."""
    name = model_name(spec.key, precision)

    def export() -> float:
        report = export_model(
            model,
            spec.tensors(size, VERIFY_ROWS, seed),
            repository=repository,
            name=name,
            task="classification",
            version=VERSION,
            input_names=list(spec.input_names),
            output_names=[OUTPUT_NAME],
            verify_samples=VERIFY_SAMPLES,
            description=f"{spec.title}; {spec.sizes[size]} (benchmark model, random weights)",
            precision=precision,
        )
        return report.elapsed_s

    for attempt in range(1, EXPORT_ATTEMPTS):
        try:
            return export()
        except VerificationError as error:
            first_line = str(error).splitlines()[0]
            log.warning("%s: attempt %d: %s; exporting again", name, attempt, first_line)
    return export()


def _reusable(folder: Path, weights: str, precision: Precision) -> bool:
    """Whether ``folder`` holds an export of exactly these weights at this precision."""
    try:
        metadata = json.loads((folder / str(VERSION) / METADATA_FILE).read_text())
    except (OSError, ValueError):
        return False
    return bool(
        metadata.get("weights_sha256") == weights
        and metadata.get("precision", "fp32") == precision
        and (folder / str(VERSION) / MODEL_FILE).exists()
    )


def prepare_real(
    wanted: Sequence[tuple[str, Precision]],
    repository: Path,
    *,
    size: Size = "full",
    seed: int = 0,
) -> dict[tuple[str, Precision], PreparedReal]:
    """Export (or reuse) realistic models into ``repository``.

    Every model is rebuilt from its fixed seed (weights, BatchNorm statistics); a folder that
    an earlier run exported from the very same weights (``weights_sha256`` of its
    metadata.json) at the same precision is reused as it is, anything else there is replaced.
    The PyTorch anchors then always run the exported weights.

    Args:
        wanted: (key of :data:`REAL_MODELS`, precision) pairs.
        repository: the model repository folder (created when missing).
        size: "full" (the benchmark's) or "smoke" (tiny).
        seed: the seed of the inputs export verification uses.

    Returns:
        (key, precision) -> the prepared model, in the order of ``wanted``.

    Raises:
        KeyError: an unknown key.
        export.errors.ExportError: an export failed, or its verification failed
            ``EXPORT_ATTEMPTS`` times.
    """
    repository.mkdir(parents=True, exist_ok=True)
    built: dict[str, tuple[nn.Module, str]] = {}
    prepared: dict[tuple[str, Precision], PreparedReal] = {}
    for key, precision in wanted:
        spec = REAL_MODELS[key]
        name = model_name(key, precision)
        folder = repository / name
        if key not in built:
            started = time.perf_counter()
            model = spec.build(size)
            built[key] = (model, weights_sha256(model))
            log.info("%s: built in %.1f s", key, time.perf_counter() - started)
        model, weights = built[key]
        export_s = 0.0
        if _reusable(folder, weights, precision):
            log.info("%s: reusing the export in %s", name, folder)
        else:
            if folder.exists():
                shutil.rmtree(folder)
            export_s = _export(
                spec, model, size=size, precision=precision, repository=repository, seed=seed
            )
            log.info("%s: exported and verified in %.1f s", name, export_s)
        prepared[(key, precision)] = PreparedReal(
            spec=spec,
            size=size,
            precision=precision,
            model=model,
            source=load_version(folder, VERSION),
            export_s=export_s,
        )
    return prepared
