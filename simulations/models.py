"""Small torch models for the built-in tasks, built fast and deterministically.

:func:`build_model` constructs the module on the ``meta`` device (no memory, no init),
materializes it uninitialized and then fills every ``Linear`` from a seeded
``torch.Generator`` with ``N(0, 1 / (3 fan_in))``: the variance of PyTorch's default
``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``, but drawn about twice as fast on CPU. That is one
pass over the parameters (about 1 s for 100M on two cores), and the global torch RNG is
left alone.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Sequence
from itertools import pairwise
from typing import Any

import torch
from torch import nn

from coordinator.errors import ConfigError


def mlp(in_features: int, hidden: Sequence[int], num_classes: int) -> nn.Sequential:
    """A stack of ``Linear`` + ``ReLU`` layers of widths ``hidden``, then a ``Linear`` head."""
    layers: list[nn.Module] = []
    width = in_features
    for out in hidden:
        layers += [nn.Linear(width, out), nn.ReLU()]
        width = out
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def logreg(in_features: int, num_classes: int) -> nn.Sequential:
    """Multinomial logistic regression: one ``Linear`` layer (softmax is in the loss)."""
    return nn.Sequential(nn.Linear(in_features, num_classes))


MODELS: dict[str, Callable[..., nn.Module]] = {"mlp": mlp, "logreg": logreg}


def mlp_num_parameters(in_features: int, hidden: Sequence[int], num_classes: int) -> int:
    """The number of parameters of ``mlp(in_features, hidden, num_classes)``."""
    widths = [in_features, *hidden, num_classes]
    return sum((a + 1) * b for a, b in pairwise(widths))


def check_model(name: str, options: Iterable[str] = ()) -> Callable[..., nn.Module]:
    """The builder of model ``name``, checking that it takes every option in ``options``.

    Raises
    ------
    ConfigError
        ``task.model`` for an unknown name, ``task.options.<option>`` for an option the
        model does not take.
    """
    builder = MODELS.get(name)
    if builder is None:
        raise ConfigError("task.model", f"unknown model {name!r}; known: {', '.join(MODELS)}")
    accepted = set(inspect.signature(builder).parameters) - {"in_features", "num_classes"}
    for option in options:
        if option not in accepted:
            raise ConfigError(f"task.options.{option}", f"not an option of model {name!r}")
    return builder


def build_model(
    name: str,
    in_features: int,
    num_classes: int,
    seed: int | None = 0,
    device: str = "cpu",
    **options: Any,
) -> nn.Module:
    """Build model ``name`` on the CPU with weights drawn from ``seed``.

    ``options`` are the model's own keyword arguments (e.g. ``hidden`` for ``mlp``).
    ``seed=None`` skips initialization and leaves the memory as found: only for a model
    whose every tensor is loaded before use (e.g. a site's, which receives the global
    model each round). ``device="meta"`` returns the module without storage (its
    tensors are supplied at call time, see ``torch.func.functional_call``).

    Raises
    ------
    ConfigError
        As :func:`check_model`.
    """
    builder = check_model(name, options)
    with torch.device("meta"):
        module = builder(in_features=in_features, num_classes=num_classes, **options)
    if device == "meta":
        return module
    module = module.to_empty(device="cpu")
    if seed is not None:
        init_parameters(module, torch.Generator().manual_seed(seed))
    return module


def init_parameters(module: nn.Module, generator: torch.Generator) -> None:
    """Initialize ``module`` in place: ``Linear`` weights and biases ~ ``N(0, 1/(3 fan_in))``.

    Other submodules with a ``reset_parameters`` method (e.g. BatchNorm) are reset with
    their own, deterministic, defaults.
    """
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, nn.Linear):
                std = 1.0 / math.sqrt(3 * sub.in_features) if sub.in_features else 0.0
                sub.weight.normal_(0.0, std, generator=generator)
                if sub.bias is not None:
                    sub.bias.normal_(0.0, std, generator=generator)
            elif hasattr(sub, "reset_parameters"):
                sub.reset_parameters()
