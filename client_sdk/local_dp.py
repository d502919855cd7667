"""Local DP-SGD at a site: Opacus per-example clipping and noise over Poisson-sampled
batches, and the site's own example-level privacy accountant.

The round config switches it on (flat scalars; local DP is on when any ``local_dp_*``
key is present, and an unknown ``local_dp_*`` key is an error):

=============================  ========  ==============================================
key                            default   meaning
=============================  ========  ==============================================
``local_dp_noise_multiplier``  required  z: noise std over the clip norm, > 0
``local_dp_max_grad_norm``     required  C: L2 bound of each example's gradient, > 0
``local_dp_delta``             required  delta of the reported epsilon, in (0, 1)
``local_dp_epsilon_budget``    none      the site refuses a fit that would pass it
``local_dp_accountant``        "rdp"     ``"rdp"`` or ``"prv"``, fixed for the client's life
=============================  ========  ==============================================

How a fit runs (see :class:`LocalPrivacy`):

- One :class:`opacus.PrivacyEngine` per client for its whole life, created at the first
  DP fit and never re-created; its accountant holds the site's spend. Its
  ``make_private`` is not used: it infers the sampling rate as ``1 / len(data_loader)``
  and cannot express ``q = batch_size / n``. The same three pieces are assembled here
  instead, once per fit, around the one engine: the client's module wrapped once in a
  ``GradSampleModule`` (weights loaded into the client's module are the ones trained), a
  fresh torch optimizer every fit (as without DP) wrapped in a ``DPOptimizer`` whose step
  hook is the engine accountant's, so the accountant takes exactly one step
  ``(z, q)`` per optimizer step, and Opacus' Poisson sampler (``DPDataLoader`` for a
  ``DataLoader``, its ``UniformWithReplacementSampler`` over an ``(x, y)`` pair) with
  ``q = batch_size / n``, ``batch_size`` from the round config in both cases. An epoch
  is Opacus' ``int(1 / q)`` steps, so a fit's steps are known before it trains.
- Budget: before training, the spend after this fit's steps is projected with an
  independent accountant over a copy of the history; past ``local_dp_epsilon_budget``
  the fit raises :class:`~client_sdk.errors.LocalBudgetExhausted` and trains nothing.
- FedProx's proximal gradient and SCAFFOLD's ``c - c_i`` are added to the gradient
  after clipping and noise, just before the optimizer's update. They depend on the
  global model, the server's variate and the site's earlier (already private) iterates,
  not on this step's data, so they are post-processing and cost no privacy; so are
  momentum, Adam's moments and weight decay.
- Persistence: with a ``state_path``, the history, a JSON list of
  ``[noise_multiplier, sample_rate, steps]``, goes to ``<state_path>.dp.json`` (next to
  SCAFFOLD's safetensors file, whose format is unchanged), written atomically with
  ``os.replace`` after each DP fit and before its result is returned: a site killed
  mid-fit released nothing, so a restarted site resumes a spend that never under-counts.
- A client with local DP spend on record (in memory or in its file) refuses a fit
  without local DP: the update would be released without any guarantee.

Limits, stated plainly:

- Opacus' ``secure_mode=True`` needs ``torchcsprng``, which cannot be installed here.
  The noise and the Poisson sampling come from torch's ordinary generators (not a
  CSPRNG), seeded per client from ``os.urandom`` so that they cannot be replayed from
  the experiment seed, and the noise is not hardened against floating-point attacks
  on Gaussian sampling. Local DP noise is therefore not CSPRNG-grade.
- The training ``loss`` and ``accuracy`` a fit reports are computed on the raw local
  data and are not covered by the guarantee; only the model update is.

Opacus is imported on the first DP fit only (it adds seconds to an import).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import numbers
import os
import secrets
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from client_sdk.errors import ClientError, LocalBudgetExhausted

if TYPE_CHECKING:
    from opacus import GradSampleModule, PrivacyEngine
    from opacus.optimizers import DPOptimizer

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]
History = list[tuple[float, float, int]]
"""An Opacus accountant history: ``(noise_multiplier, sample_rate, steps)`` entries."""

PREFIX = "local_dp_"
ACCOUNTANTS = ("rdp", "prv")
KEYS = frozenset(
    PREFIX + k
    for k in ("noise_multiplier", "max_grad_norm", "delta", "epsilon_budget", "accountant")
)
STATE_SUFFIX = ".dp.json"


@dataclass(frozen=True)
class LocalDPSettings:
    """The local DP settings of one fit, read from the round config."""

    noise_multiplier: float
    max_grad_norm: float
    delta: float
    epsilon_budget: float | None = None
    accountant: str = "rdp"

    @classmethod
    def from_config(cls, config: Mapping[str, object]) -> LocalDPSettings | None:
        """The settings, or ``None`` when no ``local_dp_*`` key is present.

        Raises
        ------
        ClientError
            Naming the first unknown, missing or bad key.
        """
        given = sorted(k for k in config if k.startswith(PREFIX))
        if not given:
            return None
        unknown = [k for k in given if k not in KEYS]
        if unknown:
            raise ClientError(f"round config {unknown[0]!r} is not a local DP setting")
        accountant = config.get(PREFIX + "accountant", cls.accountant)
        if accountant not in ACCOUNTANTS:
            raise ClientError(
                f"round config 'local_dp_accountant' must be one of {list(ACCOUNTANTS)}, "
                f"got {accountant!r}"
            )
        budget_key = PREFIX + "epsilon_budget"
        return cls(
            noise_multiplier=_positive(config, PREFIX + "noise_multiplier"),
            max_grad_norm=_positive(config, PREFIX + "max_grad_norm"),
            delta=_probability(config, PREFIX + "delta"),
            epsilon_budget=_positive(config, budget_key) if budget_key in config else None,
            accountant=str(accountant),
        )


def _number(config: Mapping[str, object], key: str) -> float:
    if key not in config:
        raise ClientError(f"round config {key!r} is missing (local DP is on)")
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ClientError(f"round config {key!r} must be a number, got {value!r}")
    return float(value)


def _positive(config: Mapping[str, object], key: str) -> float:
    value = _number(config, key)
    if not (math.isfinite(value) and value > 0):
        raise ClientError(f"round config {key!r} must be a finite number > 0, got {value!r}")
    return value


def _probability(config: Mapping[str, object], key: str) -> float:
    value = _number(config, key)
    if not 0 < value < 1:
        raise ClientError(f"round config {key!r} must be in (0, 1), got {value!r}")
    return value


def state_file(state_path: Path | None) -> Path | None:
    """Where the accountant history of a client with ``state_path`` is kept."""
    return None if state_path is None else state_path.with_name(state_path.name + STATE_SUFFIX)


def extend(history: History, noise_multiplier: float, sample_rate: float, steps: int) -> History:
    """A new history with ``steps`` more steps at ``(z, q)``, merged as Opacus merges."""
    result = list(history)
    if result and result[-1][:2] == (noise_multiplier, sample_rate):
        result[-1] = (noise_multiplier, sample_rate, result[-1][2] + steps)
    elif steps > 0:
        result.append((noise_multiplier, sample_rate, steps))
    return result


def epsilon(kind: str, history: History, delta: float) -> float:
    """Epsilon at ``delta`` of ``history``, by an independent accountant of ``kind``."""
    if not history:
        return 0.0
    from opacus.accountants import create_accountant

    accountant = create_accountant(mechanism=kind)
    accountant.history = list(history)
    return float(accountant.get_epsilon(delta=delta))


def noisy_step(optimizer: torch.optim.Optimizer, corrections: list[Callable[[], None]]) -> None:
    """Clip, noise and account (Opacus' ``pre_step``), apply the data-independent
    ``corrections`` to the noisy gradient, then update (``optimizer`` is a DPOptimizer)."""
    optimizer = cast("DPOptimizer", optimizer)
    if optimizer.pre_step():
        for correct in corrections:
            correct()
        optimizer.original_optimizer.step()


@functools.cache
def _warn_once() -> None:
    """Say once per process what local DP noise is made of, and silence torch's
    harmless warning about Opacus' backward hooks on the input layer."""
    log.warning(
        "local DP: noise and sampling use torch's generator seeded from os.urandom, "
        "not a CSPRNG (Opacus secure_mode needs torchcsprng)"
    )
    warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)


class LocalPrivacy:
    """A client's local DP: its one engine, the wrapped module, its spend and its file.

    Parameters
    ----------
    state_path
        The client's SCAFFOLD state file; the history lives in ``<state_path>.dp.json``
        and is loaded now when present. ``None`` keeps it in memory only.
    """

    def __init__(self, state_path: Path | None) -> None:
        self.path = state_file(state_path)
        self._restored = _load_history(self.path)
        self.engine: PrivacyEngine | None = None
        self.module: GradSampleModule | None = None
        """The client's module wrapped for per-example gradients (hooks on its layers)."""
        self._kind: str | None = None
        self._noise: torch.Generator | None = None
        self._sampling = torch.Generator().manual_seed(secrets.randbits(63))

    @property
    def history(self) -> History:
        """The spend so far (a copy)."""
        if self.engine is None:
            return list(self._restored)
        return [(float(z), float(q), int(n)) for z, q, n in self.engine.accountant.history]

    @property
    def started(self) -> bool:
        """Whether local DP is in use: an engine exists or spend is on record."""
        return self.engine is not None or bool(self._restored)

    def plan(
        self,
        config: Mapping[str, object],
        model: nn.Module,
        data: object,
        batch_size: int,
        epochs: int,
        device: torch.device,
    ) -> DPFit | None:
        """Prepare one fit: ``None`` without local DP keys, else its :class:`DPFit`.

        Creates the engine and wraps ``model`` on the first DP fit; otherwise mutates
        nothing (the accountant is untouched until training steps).

        Raises
        ------
        ClientError
            A bad ``local_dp_*`` key, a model Opacus cannot train, data it cannot sample,
            a changed accountant, or a fit without local DP after local DP spend.
        LocalBudgetExhausted
            When this fit's steps would take epsilon past ``local_dp_epsilon_budget``.
        """
        settings = LocalDPSettings.from_config(config)
        if settings is None:
            if self.started:
                steps = sum(s for _, _, s in self.history)
                raise ClientError(
                    f"this site has taken {steps} local DP-SGD steps and refuses to train "
                    "without local DP (the round config has no local_dp_* keys)"
                )
            return None
        sampler = _PoissonBatches(data, batch_size, self._sampling, device)
        self._start(model, settings)
        q, steps = sampler.sample_rate, epochs * sampler.steps_per_epoch
        z = settings.noise_multiplier
        if settings.epsilon_budget is not None:
            now = self.history
            projected = epsilon(settings.accountant, extend(now, z, q, steps), settings.delta)
            if projected > settings.epsilon_budget:
                spent = epsilon(settings.accountant, now, settings.delta)
                raise LocalBudgetExhausted(
                    f"local DP budget exhausted: this fit's {steps} steps would take the "
                    f"site's epsilon from {spent:.4g} to {projected:.4g} at delta "
                    f"{settings.delta:g}, past local_dp_epsilon_budget "
                    f"{settings.epsilon_budget:g}; the site does not train"
                )
        return DPFit(self, settings, sampler, steps)

    def _start(self, model: nn.Module, settings: LocalDPSettings) -> None:
        """Create the engine and wrap ``model``, once; check the accountant stays one kind."""
        if self.engine is not None:
            if settings.accountant != self._kind:
                raise ClientError(
                    f"round config 'local_dp_accountant' changed from {self._kind!r} to "
                    f"{settings.accountant!r}; a site keeps one accountant for its whole life"
                )
            return
        from opacus import GradSampleModule, PrivacyEngine
        from opacus.validators import ModuleValidator

        model.train()  # Opacus validates (and trains) in training mode
        problems = ModuleValidator.validate(model, strict=False)
        if problems:
            reasons = sorted({str(p).split(". ")[0] for p in problems})
            raise ClientError(
                f"local DP (Opacus) cannot train this model: {'; '.join(reasons)}. "
                "Replace such modules, e.g. BatchNorm with GroupNorm "
                "(opacus.validators.ModuleValidator.fix does it)"
            )
        try:
            module = GradSampleModule(model, loss_reduction="mean", strict=True)
        except (NotImplementedError, ValueError) as exc:
            raise ClientError(f"local DP (Opacus) cannot train this model: {exc}") from None
        module.forbid_grad_accumulation()
        with warnings.catch_warnings():
            # Opacus warns that secure RNG is off; the module docstring and the log say so.
            warnings.filterwarnings("ignore", message="Secure RNG turned off")
            engine = PrivacyEngine(accountant=settings.accountant, secure_mode=False)
        engine.accountant.history = list(self._restored)
        device = next(model.parameters()).device
        self._noise = torch.Generator(device=device).manual_seed(secrets.randbits(63))
        self.engine, self.module, self._kind = engine, module, settings.accountant
        _warn_once()

    def _save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        payload = {"accountant": self._kind, "history": [list(h) for h in self.history]}
        tmp.write_text(json.dumps(payload))
        os.replace(tmp, self.path)


class DPFit:
    """One planned DP fit: its optimizer, its batches and, at the end, its metrics."""

    def __init__(
        self,
        privacy: LocalPrivacy,
        settings: LocalDPSettings,
        sampler: _PoissonBatches,
        steps: int,
    ) -> None:
        self._privacy = privacy
        self.settings = settings
        self.steps = steps
        self.sample_rate = sampler.sample_rate
        self.num_examples = sampler.num_examples
        self._sampler = sampler
        self._optimizer: DPOptimizer | None = None

    def optimizer(self, base: torch.optim.Optimizer, batch_size: int) -> DPOptimizer:
        """Wrap this fit's fresh ``base`` optimizer: clipping, noise, accounting."""
        from opacus.optimizers import DPOptimizer

        engine = self._privacy.engine
        assert engine is not None
        optimizer = DPOptimizer(
            base,
            noise_multiplier=self.settings.noise_multiplier,
            max_grad_norm=self.settings.max_grad_norm,
            expected_batch_size=batch_size,
            loss_reduction="mean",
            generator=self._privacy._noise,
        )
        optimizer.attach_step_hook(engine.accountant.get_optimizer_hook_fn(self.sample_rate))
        self._optimizer = optimizer
        return optimizer

    def batches(self) -> Iterator[Batch]:
        """One epoch of Poisson-sampled batches (some may be empty)."""
        return self._sampler.epoch()

    def finish(self) -> dict[str, float]:
        """Persist the spend; the metrics ``epsilon`` (cumulative) and ``delta``."""
        if self._optimizer is not None:
            self._optimizer.zero_grad(set_to_none=True)  # drop per-example gradients
        self._privacy._save()
        engine = self._privacy.engine
        assert engine is not None
        delta = self.settings.delta
        return {"epsilon": float(engine.accountant.get_epsilon(delta=delta)), "delta": delta}


class _PoissonBatches:
    """Opacus' Poisson sampling with rate ``batch_size / n`` over the local data."""

    def __init__(
        self, data: object, batch_size: int, generator: torch.Generator, device: torch.device
    ) -> None:
        from opacus.data_loader import DPDataLoader
        from opacus.utils.uniform_sampler import UniformWithReplacementSampler
        from torch.utils.data import DataLoader, IterableDataset

        self._pair: Batch | None = None
        self._loader: DataLoader | None = None
        self._device = device
        if _is_tensor_pair(data):
            self._pair = data  # type: ignore[assignment]
            n = len(self._pair[0])
        elif isinstance(data, DataLoader) and not isinstance(data.dataset, IterableDataset):
            n = len(data.dataset)  # type: ignore[arg-type]
        else:
            raise ClientError(
                "local DP samples examples itself: give the client an (x, y) pair of tensors "
                "or a DataLoader over a map-style dataset"
            )
        if batch_size > n:
            raise ClientError(
                f"round config 'batch_size' ({batch_size}) exceeds the site's {n} examples; "
                "local DP samples each example with probability batch_size / n"
            )
        self.num_examples = n
        self.sample_rate = batch_size / n
        if self._pair is not None:
            self._sampler: Any = UniformWithReplacementSampler(
                num_samples=n, sample_rate=self.sample_rate, generator=generator
            )
            self.steps_per_epoch = len(self._sampler)
        else:
            assert isinstance(data, DataLoader)
            self._loader = DPDataLoader(
                data.dataset,
                sample_rate=self.sample_rate,
                collate_fn=data.collate_fn,
                generator=generator,
            )
            self.steps_per_epoch = len(self._loader)

    def epoch(self) -> Iterator[Batch]:
        if self._pair is not None:
            x, y = self._pair
            for index in self._sampler:
                rows = torch.as_tensor(index, dtype=torch.long, device=x.device)
                yield x[rows], y[rows]
            return
        assert self._loader is not None
        for x, y in self._loader:
            yield x.to(self._device), y.to(self._device)


def _is_tensor_pair(data: object) -> bool:
    return (
        isinstance(data, tuple)
        and len(data) == 2
        and all(isinstance(t, torch.Tensor) for t in data)
    )


def _load_history(path: Path | None) -> History:
    """The history in ``path`` (empty when there is no file); a bad file is an error."""
    if path is None or not path.exists():
        return []
    try:
        payload = json.loads(path.read_text())
        history = [(float(z), float(q), int(n)) for z, q, n in payload["history"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ClientError(f"local DP state file {path} is unreadable: {exc}") from None
    for z, q, n in history:
        if not (z > 0 and 0 < q <= 1 and n >= 0):
            raise ClientError(f"local DP state file {path} holds a bad entry {(z, q, n)}")
    return history
