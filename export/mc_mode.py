"""PyTorch MC dropout mode: the reference semantics every exported graph must reproduce.

MC dropout means the network runs in inference mode (BatchNorm uses its running statistics,
and so on) except for the dropout modules, which keep sampling masks. The exporter never
touches the caller's model: it works on a deep copy switched into this mode.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from torch import nn

from export.errors import NoDropoutError, ZeroDropoutError

__all__ = [
    "DROPOUT_TYPES",
    "DropoutModule",
    "active_dropout",
    "find_dropout_modules",
    "mc_dropout_copy",
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
