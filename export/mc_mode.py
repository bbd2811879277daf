"""PyTorch MC dropout mode: the reference semantics every exported graph must reproduce.

MC dropout means the network runs in inference mode (BatchNorm uses its running statistics,
and so on) except for the dropout modules, which keep sampling masks. The exporter never
touches the caller's model: it works on a deep copy switched into this mode.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from export.errors import ExportArgumentError, NoDropoutError, ZeroDropoutError

__all__ = [
    "DROPOUT_TYPES",
    "DropoutModule",
    "ForwardProbe",
    "active_dropout",
    "fastpath_disabled",
    "find_dropout_modules",
    "mc_dropout_copy",
    "probe_forward",
]

#: The dropout modules MC mode switches to training mode (subclasses included).
DROPOUT_TYPES: tuple[type[nn.Module], ...] = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)


@dataclass(frozen=True)
class DropoutModule:
    """One dropout module of a model.

    Attributes:
        module: qualified name in the model (``model.get_submodule(module)``), e.g. "head.1".
        type: class name, e.g. "Dropout2d".
        p: the drop probability.
    """

    module: str
    type: str
    p: float

    def to_dict(self) -> dict[str, Any]:
        """The ``dropout[]`` entry of metadata.json."""
        return {"module": self.module, "type": self.type, "p": self.p}


def find_dropout_modules(model: nn.Module) -> list[DropoutModule]:
    """List the dropout modules of ``model`` in ``named_modules()`` order.

    Args:
        model: any module.

    Returns:
        One entry per dropout module, including those with p == 0.
    """
    return [
        # vars(): nn.Module.__getattr__ types every attribute as Tensor | Module; p is a float.
        DropoutModule(
            module=name or "<root>", type=type(module).__name__, p=float(vars(module)["p"])
        )
        for name, module in model.named_modules()
        if isinstance(module, DROPOUT_TYPES)
    ]


def active_dropout(model: nn.Module) -> list[DropoutModule]:
    """The dropout modules that produce randomness (p > 0); fail loudly when there are none.

    Args:
        model: the model to export.

    Returns:
        The dropout modules with p > 0.

    Raises:
        NoDropoutError: the model has no dropout module.
        ZeroDropoutError: every dropout module has p == 0 (they are named).
    """
    modules = find_dropout_modules(model)
    if not modules:
        raise NoDropoutError(
            f"{type(model).__name__} has no dropout module "
            f"({', '.join(t.__name__ for t in DROPOUT_TYPES)}): MC dropout would return "
            "identical samples"
        )
    active = [m for m in modules if m.p > 0.0]
    if not active:
        names = ", ".join(f"{m.module} ({m.type}, p={m.p})" for m in modules)
        raise ZeroDropoutError(
            f"every dropout module of {type(model).__name__} has p == 0: {names}; "
            "MC dropout would return identical samples"
        )
    return active


def mc_dropout_copy(model: nn.Module) -> nn.Module:
    """Return a deep copy of ``model`` in MC dropout mode; ``model`` itself is not touched.

    The copy is in ``eval()`` mode except for the dropout modules (``DROPOUT_TYPES``), which
    are in ``train()`` mode: BatchNorm keeps using its running statistics, dropout samples.

    Args:
        model: the trained model.

    Returns:
        The copy, with ``requires_grad`` off on every parameter (it is only ever run).
    """
    mc_model = copy.deepcopy(model)
    mc_model.eval()
    for module in mc_model.modules():
        if isinstance(module, DROPOUT_TYPES):
            module.train()
    for parameter in mc_model.parameters():
        parameter.requires_grad_(False)
    return mc_model


@contextlib.contextmanager
def fastpath_disabled() -> Iterator[None]:
    """Turn PyTorch's fused inference fast paths off for the duration (restored after).

    ``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer`` and ``nn.TransformerEncoder``
    take a fused kernel when the module is in eval mode and no gradient is needed (under
    ``no_grad`` or with ``requires_grad`` off, as in MC mode). That kernel skips the
    layer's dropout modules altogether although they are in training mode, so the PyTorch
    reference would have no variance while the exported graph (traced through the slow path)
    samples. With the fast path off both run the same code.
    """
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


@dataclass(frozen=True)
class ForwardProbe:
    """One forward pass of the MC copy, and which dropout modules it ran.

    Attributes:
        outputs: the model's outputs, one tensor per graph output.
        ran: qualified names of the dropout modules whose forward ran at least once.
    """

    outputs: tuple[torch.Tensor, ...]
    ran: frozenset[str]


def probe_forward(mc_model: nn.Module, inputs: Sequence[torch.Tensor]) -> ForwardProbe:
    """Run ``mc_model`` once (no_grad, fast paths off) and record the dropout modules that run.

    A dropout module can exist without running: attention implementations that call a fused
    kernel pass the module's rate as ``dropout_p`` only when the attention module itself is
    training (Hugging Face BERT's eager attention, timm's Attention), so in MC mode (attention
    in eval) the module is skipped, in PyTorch as in the traced graph. Forward hooks tell
    which ones run.

    Args:
        mc_model: a model from ``mc_dropout_copy``.
        inputs: one tensor per model input, each (B, ...).

    Returns:
        The outputs and the names of the dropout modules that ran.

    Raises:
        ExportArgumentError: the model does not return a tensor or a tuple of tensors.
    """
    ran: set[str] = set()
    handles = [
        module.register_forward_hook(lambda _m, _i, _o, name=name or "<root>": ran.add(name))
        for name, module in mc_model.named_modules()
        if isinstance(module, DROPOUT_TYPES)
    ]
    try:
        with torch.no_grad(), fastpath_disabled():
            result = mc_model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    outputs = tuple(result) if isinstance(result, (tuple, list)) else (result,)
    if not outputs or not all(isinstance(o, torch.Tensor) for o in outputs):
        raise ExportArgumentError(
            f"the model must return a tensor or a tuple of tensors, got {type(result).__name__}"
        )
    return ForwardProbe(outputs=outputs, ran=frozenset(ran))
