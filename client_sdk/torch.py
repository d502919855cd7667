"""Turning a ``torch.nn.Module`` and its data into a site :class:`~client_sdk.api.Client`.

The model travels as its ``state_dict``: :func:`arrays_from_module` and
:func:`load_arrays` convert between a module and named numpy arrays, keeping every dtype
(float32 stays float32, BatchNorm's int64 counters stay int64); :func:`load_model_file`
loads a model file exported with ``fedcoord models export``, checking its digest.

:class:`TorchClient` trains with the round configuration the coordinator sends (flat,
scalar values):

==================  =======  =================================================
key                 default  meaning
==================  =======  =================================================
``local_epochs``    1        passes over the local data per fit
``batch_size``      32       batch size when the client batches its own tensors
``optimizer``       "sgd"    ``"sgd"`` or ``"adam"``, created fresh every fit
``lr``              0.01     learning rate
``momentum``        0.0      SGD momentum (ignored by Adam)
``weight_decay``    0.0      L2 penalty
``proximal_mu``     0.0      FedProx: adds (mu/2)||w - w_global||^2 to the loss
==================  =======  =================================================

SCAFFOLD (Karimireddy et al. 2020) is driven by the arrays: when the coordinator sends
server control variates as ``scaffold.c/<tensor>`` next to the model, each gradient is
corrected by ``c - c_i`` and the result carries ``scaffold.delta_c/<tensor>``. The
site's own variate ``c_i`` persists across rounds, and across restarts when the client
has a ``state_path``.

Local DP-SGD (Opacus) is driven by the round config's ``local_dp_*`` keys; see
:mod:`client_sdk.local_dp`. Its spend persists in ``<state_path>.dp.json``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from torch import nn

from client_sdk.api import Arrays, Client, Config, EvaluateResult, FitResult
from client_sdk.errors import ClientError
from client_sdk.local_dp import LocalPrivacy, noisy_step
from protos.codec import digest_arrays
from strategies.drift import DataProfile, profile_of, profile_settings
from strategies.scaffold import CONTROL as SCAFFOLD_C
from strategies.scaffold import DELTA_CONTROL as SCAFFOLD_DELTA_C

Batch = tuple[torch.Tensor, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
TrainData = Iterable[Batch] | tuple[torch.Tensor, torch.Tensor]
"""Either an iterable of ``(x, y)`` batches (e.g. a ``DataLoader``) or one ``(x, y)``
pair of tensors holding the whole local dataset."""

DEFAULT_BATCH_SIZE = 32
GradientCorrection = Callable[[], None]
"""Called after ``backward()`` and before ``optimizer.step()`` to adjust the gradients."""
Step = Callable[[torch.optim.Optimizer, list[GradientCorrection]], None]
"""Applies the corrections and updates the parameters (differently under local DP)."""


def _step(optimizer: torch.optim.Optimizer, corrections: list[GradientCorrection]) -> None:
    for correct in corrections:
        correct()
    optimizer.step()


def arrays_from_module(module: nn.Module, copy: bool = True) -> dict[str, np.ndarray]:
    """The module's ``state_dict`` as contiguous CPU numpy copies, dtypes preserved.

    ``copy=False`` returns arrays sharing the memory of contiguous CPU tensors (for a
    module that is discarded or no longer changed: no second model in memory).
    """
    arrays: dict[str, np.ndarray] = {}
    for name, tensor in module.state_dict().items():
        try:
            array = tensor.detach().cpu().numpy()
            shared = not copy and array.flags.c_contiguous
            arrays[name] = array if shared else array.copy(order="C")
        except TypeError as exc:  # e.g. bfloat16 has no numpy dtype
            raise ClientError(f"tensor {name!r} cannot become a numpy array: {exc}") from None
    return arrays


def load_arrays(module: nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Copy ``arrays`` into the module's parameters and buffers, in place.

    The load is strict: the names must be exactly those of the ``state_dict`` and each
    array must have the tensor's shape and dtype.

    Raises
    ------
    ClientError
        Naming the first missing, unexpected or mismatched tensor.
    """
    state = module.state_dict()
    check_arrays(module, arrays)
    with torch.no_grad():
        for name, target in state.items():
            target.copy_(source_tensor(arrays[name]))


def check_arrays(module: nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Raise :class:`ClientError` unless ``arrays`` has exactly the names, shapes and
    dtypes of the module's ``state_dict`` (the module may live on the ``meta`` device)."""
    state = module.state_dict()
    _check_names(state.keys(), arrays.keys())
    for name, target in state.items():
        _check_array(name, target, arrays[name])


def load_model_file(
    module: nn.Module, path: str | Path, *, expected_digest: str | None = None
) -> nn.Module:
    """Load a safetensors model file (e.g. from ``fedcoord models export``) into ``module``.

    When ``expected_digest`` (``sha256:<hex>``) is given, the arrays' payload digest must
    equal it. The load is as strict as :func:`load_arrays`. Returns ``module``.

    Raises
    ------
    ClientError
        When the file cannot be read, its digest differs, or it does not fit the module.
    """
    try:
        arrays = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types on corrupt files
        raise ClientError(f"cannot read model file {path}: {exc}") from None
    if expected_digest is not None:
        actual = digest_arrays(arrays)
        if actual != expected_digest:
            raise ClientError(f"model file {path} has digest {actual}, not {expected_digest}")
    load_arrays(module, arrays)
    return module


def _check_names(expected: Iterable[str], given: Iterable[str]) -> None:
    expected_set, given_set = set(expected), set(given)
    missing = sorted(expected_set - given_set)
    if missing:
        raise ClientError(f"tensor {missing[0]!r} of the model is missing from the arrays")
    unexpected = sorted(given_set - expected_set)
    if unexpected:
        raise ClientError(f"tensor {unexpected[0]!r} is not part of the model")


def _check_array(name: str, target: torch.Tensor, array: np.ndarray) -> None:
    if not isinstance(array, np.ndarray):
        raise ClientError(f"tensor {name!r} must be a numpy array, got {type(array).__name__}")
    if array.shape != tuple(target.shape):
        raise ClientError(
            f"tensor {name!r} has shape {array.shape}, the model expects {tuple(target.shape)}"
        )
    expected = _numpy_dtype(name, target.dtype)
    if array.dtype.newbyteorder("=") != expected:
        raise ClientError(f"tensor {name!r} has dtype {array.dtype}, the model expects {expected}")


def _numpy_dtype(name: str, dtype: torch.dtype) -> np.dtype:
    try:
        return torch.empty(0, dtype=dtype).numpy().dtype
    except TypeError:
        raise ClientError(f"tensor {name!r} has dtype {dtype} with no numpy equivalent") from None


def source_tensor(array: np.ndarray) -> torch.Tensor:
    """A CPU tensor over ``array`` that is only read (a copy source): shares its memory
    even when it is read-only, so loading a received model costs no temporary copy."""
    if not (array.dtype.isnative and array.flags.c_contiguous):
        return _as_tensor(array)
    with warnings.catch_warnings():  # torch warns that a read-only array is shared
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def _as_tensor(array: np.ndarray) -> torch.Tensor:
    """A CPU tensor over ``array``, copying only when torch cannot share its memory."""
    if not (array.dtype.isnative and array.flags.c_contiguous and array.flags.writeable):
        array = np.array(array, dtype=array.dtype.newbyteorder("="), order="C", copy=True)
    return torch.from_numpy(array)


@dataclass
class EvalStats:
    """Mean loss, accuracy (``None`` when not a classification) and example count."""

    loss: float
    accuracy: float | None
    num_examples: int

    def metrics(self) -> dict[str, float]:
        """``{"loss": ..., "accuracy": ...}`` (accuracy only when defined)."""
        result = {"loss": self.loss}
        if self.accuracy is not None:
            result["accuracy"] = self.accuracy
        return result


class _Tally:
    """Running sums over batches; kept on the device to avoid a sync per batch."""

    def __init__(self) -> None:
        self.loss_sum: torch.Tensor | None = None
        self.correct: torch.Tensor | None = None
        self.count = 0
        self.classification = True

    def add(self, loss: torch.Tensor, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        n = len(targets)
        batch_loss = loss.detach() * n
        self.loss_sum = batch_loss if self.loss_sum is None else self.loss_sum + batch_loss
        self.count += n
        if self.classification and _is_classification(outputs, targets):
            hits = (outputs.detach().argmax(dim=1) == targets).sum()
            self.correct = hits if self.correct is None else self.correct + hits
        else:
            self.classification = False

    def result(self) -> EvalStats:
        if self.count == 0 or self.loss_sum is None:
            raise ClientError("the data yielded no examples")
        accuracy = None
        if self.classification and self.correct is not None:
            accuracy = float(self.correct.item()) / self.count
        return EvalStats(float(self.loss_sum.item()) / self.count, accuracy, self.count)


def _is_classification(outputs: torch.Tensor, targets: torch.Tensor) -> bool:
    return outputs.dim() == 2 and targets.dim() == 1 and not targets.is_floating_point()


def iterate_batches(
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    generator: torch.Generator | None = None,
) -> Iterator[Batch]:
    """Batches of ``(x, y)`` in order, or shuffled with ``generator`` when one is given."""
    n = len(x)
    if generator is None:
        for start in range(0, n, batch_size):
            yield x[start : start + batch_size], y[start : start + batch_size]
        return
    order = torch.randperm(n, generator=generator).to(x.device)
    for start in range(0, n, batch_size):
        index = order[start : start + batch_size]
        yield x[index], y[index]


def evaluate_module(
    module: nn.Module,
    batches: Iterable[Batch],
    loss_fn: LossFn | None = None,
    device: str | torch.device = "cpu",
) -> EvalStats:
    """Mean loss and accuracy of ``module`` over ``batches``, without gradient tracking.

    ``loss_fn`` must return the batch mean (default: cross-entropy). The module is put in
    eval mode and stays there.
    """
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    tally = _Tally()
    module.eval()
    with torch.no_grad():
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            outputs = module(x)
            tally.add(loss_fn(outputs, y), outputs, y)
    return tally.result()


@dataclass(frozen=True)
class FitSettings:
    """The training settings of one fit, read from the round config."""

    local_epochs: int = 1
    batch_size: int = DEFAULT_BATCH_SIZE
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    proximal_mu: float = 0.0

    @classmethod
    def from_config(cls, config: Mapping[str, object]) -> FitSettings:
        """Read the settings, defaulting absent keys; a bad value raises ClientError."""
        optimizer = config.get("optimizer", cls.optimizer)
        if optimizer not in _OPTIMIZERS:
            raise ClientError(
                f"round config 'optimizer' must be one of {sorted(_OPTIMIZERS)}, got {optimizer!r}"
            )
        return cls(
            local_epochs=_config_int(config, "local_epochs", cls.local_epochs),
            batch_size=_config_int(config, "batch_size", cls.batch_size),
            optimizer=str(optimizer),
            lr=_config_float(config, "lr", cls.lr, positive=True),
            momentum=_config_float(config, "momentum", cls.momentum),
            weight_decay=_config_float(config, "weight_decay", cls.weight_decay),
            proximal_mu=_config_float(config, "proximal_mu", cls.proximal_mu),
        )


def _config_int(config: Mapping[str, object], key: str, default: int) -> int:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ClientError(f"round config {key!r} must be an integer >= 1, got {value!r}")
    return int(value)


def _config_float(
    config: Mapping[str, object], key: str, default: float, positive: bool = False
) -> float:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float | np.number):
        raise ClientError(f"round config {key!r} must be a number, got {value!r}")
    if not np.isfinite(value) or value < 0 or (positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        raise ClientError(f"round config {key!r} must be a finite number {bound}, got {value!r}")
    return float(value)


def _make_optimizer(params: Iterable[nn.Parameter], settings: FitSettings) -> torch.optim.Optimizer:
    return _OPTIMIZERS[settings.optimizer](params, settings)


_OPTIMIZERS: dict[str, Callable[[Iterable[nn.Parameter], FitSettings], torch.optim.Optimizer]] = {
    "sgd": lambda params, s: torch.optim.SGD(
        params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay
    ),
    "adam": lambda params, s: torch.optim.Adam(params, lr=s.lr, weight_decay=s.weight_decay),
}


class TorchClient(Client):
    """A :class:`Client` training a torch module on local data.

    Parameters
    ----------
    model
        The module; it is moved to ``device`` and receives the global model every round.
    train_data
        Either an iterable of ``(x, y)`` batches, such as a ``DataLoader`` (used as is;
        its own batch size and shuffling apply), or one ``(x, y)`` pair of tensors holding
        the whole local dataset, which the client moves to ``device`` once and batches
        itself with the round config's ``batch_size``, shuffled by a generator seeded
        with ``seed``.
    test_data
        Data for :meth:`evaluate`, in either form; ``None`` evaluates on ``train_data``.
    loss_fn
        Returns the mean loss of a batch; default cross-entropy.
    device
        Where training runs (``"cpu"``, ``"cuda"``, ...). Results are CPU numpy arrays.
    seed
        Seed of the shuffling of a ``(x, y)`` pair.
    state_path
        Where the site's SCAFFOLD control variate is kept between runs of the site
        (a safetensors file; the local DP spend goes to ``<state_path>.dp.json``);
        ``None`` keeps them in memory only.
    """

    def __init__(
        self,
        model: nn.Module,
        train_data: TrainData,
        test_data: TrainData | None = None,
        loss_fn: LossFn | None = None,
        device: str | torch.device = "cpu",
        seed: int = 0,
        state_path: str | Path | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.loss_fn: LossFn = loss_fn or nn.CrossEntropyLoss()
        self._train = self._on_device(train_data)
        self._test = None if test_data is None else self._on_device(test_data)
        self._generator = torch.Generator().manual_seed(seed)
        self._privacy = LocalPrivacy(None)
        self.use_state_file(state_path)

    def use_state_file(self, state_path: str | Path | None) -> None:
        """Keep the site's SCAFFOLD variate in ``state_path`` and its local DP spend in
        ``<state_path>.dp.json`` (both loaded now if present)."""
        if self._privacy.engine is not None:
            raise ClientError("the state file cannot change once local DP training has started")
        self.state_path = Path(state_path) if state_path is not None else None
        self._c_local = self._load_control()
        self._privacy = LocalPrivacy(self.state_path)

    def fit(self, arrays: Arrays, config: Config) -> FitResult:
        """Load ``arrays``, train ``local_epochs`` epochs, return the trained model.

        ``num_examples`` is the number of examples in one epoch (the local dataset size
        under local DP); the metrics ``loss`` and ``accuracy`` are over the last epoch,
        plus ``epsilon`` and ``delta`` under local DP.

        Raises
        ------
        LocalBudgetExhausted
            Before anything is loaded or trained, when the fit would pass the site's
            local DP budget.
        """
        model_arrays = {k: v for k, v in arrays.items() if not k.startswith(SCAFFOLD_C)}
        control = {
            k.removeprefix(SCAFFOLD_C): v for k, v in arrays.items() if k.startswith(SCAFFOLD_C)
        }
        settings = FitSettings.from_config(config)
        if control and settings.optimizer != "sgd":
            raise ClientError("SCAFFOLD needs the sgd optimizer")
        dp = self._privacy.plan(
            config, self.model, self._train, settings.batch_size, settings.local_epochs, self.device
        )
        load_arrays(self.model, model_arrays)
        optimizer = _make_optimizer(self.model.parameters(), settings)
        step: Step = _step
        if dp is not None:
            optimizer, step = dp.optimizer(optimizer, settings.batch_size), noisy_step
        corrections = self._corrections(settings, control)
        self.model.train()
        steps = 0
        for _ in range(settings.local_epochs):
            if dp is None:
                batches = self._batches(self._train, settings.batch_size, shuffle=True)
            else:
                batches = dp.batches()
            stats, n = self._train_epoch(optimizer, batches, corrections, step)
            steps += n
        optimizer.zero_grad(set_to_none=True)  # the gradients go before the result's copy
        result = arrays_from_module(self.model)
        if control:
            step_size = settings.lr / (1.0 - settings.momentum)  # heavy-ball effective step
            result.update(self._scaffold_deltas(model_arrays, control, steps, step_size))
        metrics, num_examples = stats.metrics(), stats.num_examples
        if dp is not None:
            metrics.update(dp.finish())
            num_examples = dp.num_examples
        return FitResult(result, num_examples, metrics)

    def evaluate(self, arrays: Arrays, config: Config) -> EvaluateResult:
        """Loss and accuracy of ``arrays`` on the test data (or the training data)."""
        load_arrays(self.model, arrays)
        batch_size = _config_int(config, "batch_size", DEFAULT_BATCH_SIZE)
        data = self._test if self._test is not None else self._train
        batches = self._batches(data, batch_size, shuffle=False)
        stats = evaluate_module(self.model, batches, self.loss_fn, self.device)
        metrics = stats.metrics()
        metrics.pop("loss")
        return EvaluateResult(stats.loss, stats.num_examples, metrics)

    def profile(self, config: Config) -> DataProfile | None:
        """Label and feature counts of the training data (for the drift checks)."""
        bins, low, high = profile_settings(config)
        parts = []
        for x, y in self._batches(self._train, DEFAULT_BATCH_SIZE * 32, shuffle=False):
            parts.append(profile_of(x.cpu().numpy(), y.cpu().numpy(), bins, low, high))
        if not parts:
            return None
        width = max(len(p.labels) for p in parts)
        labels = sum(np.pad(p.labels, (0, width - len(p.labels))) for p in parts)
        features = None if bins is None else sum(p.features for p in parts)  # type: ignore[misc]
        return DataProfile(sum(p.num_examples for p in parts), labels, features)

    def _train_epoch(
        self,
        optimizer: torch.optim.Optimizer,
        batches: Iterable[Batch],
        corrections: list[GradientCorrection],
        step: Step,
    ) -> tuple[EvalStats, int]:
        """One pass over ``batches``; the stats and the number of optimizer steps.

        An empty batch (Poisson sampling can draw one) still takes its step, noise only
        under local DP, and is left out of the stats.
        """
        tally = _Tally()
        steps = 0
        for x, y in batches:
            optimizer.zero_grad(set_to_none=False)
            outputs = self.model(x)
            loss = self.loss_fn(outputs, y)
            loss.backward()
            step(optimizer, corrections)
            if len(y):
                tally.add(loss, outputs, y)
            steps += 1
        return tally.result(), steps

    def _parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def _corrections(
        self, settings: FitSettings, control: Mapping[str, np.ndarray]
    ) -> list[GradientCorrection]:
        """FedProx's proximal gradient and SCAFFOLD's drift correction, as configured."""
        params = self._parameters()
        corrections: list[GradientCorrection] = []
        if settings.proximal_mu > 0:
            anchor = {n: p.detach().clone() for n, p in params.items()}
            mu = settings.proximal_mu

            def proximal() -> None:
                for n, p in params.items():
                    p.grad.add_(p.detach() - anchor[n], alpha=mu)

            corrections.append(proximal)
        if control:
            missing = params.keys() - control.keys()
            if missing:
                raise ClientError(f"SCAFFOLD control variates lack {sorted(missing)[:3]}")
            shift = {
                n: _as_tensor(control[n]).to(self.device) - self._local_control(n, p)
                for n, p in params.items()
            }

            def scaffold() -> None:
                for n, p in params.items():
                    p.grad.add_(shift[n])

            corrections.append(scaffold)
        return corrections

    def _local_control(self, name: str, param: torch.Tensor) -> torch.Tensor:
        if name not in self._c_local:
            self._c_local[name] = torch.zeros_like(param.detach())
        return self._c_local[name].to(self.device)

    def _scaffold_deltas(
        self, start: Arrays, control: Mapping[str, np.ndarray], steps: int, lr: float
    ) -> dict[str, np.ndarray]:
        """Update c_i <- c_i - c + (x - y_i) / (K lr) (option II of the paper; ``lr`` is the
        effective step, lr / (1 - momentum) under SGD momentum) and return
        ``scaffold.delta_c/<tensor>`` for every float tensor (zero for non-parameters)."""
        params = self._parameters()
        deltas: dict[str, np.ndarray] = {}
        for name, x in start.items():
            if x.dtype.kind != "f":
                continue
            delta = np.zeros_like(x)
            if name in params and steps > 0:
                p = params[name].detach()
                old = self._local_control(name, p)
                drift = (_as_tensor(x).to(self.device) - p) / (steps * lr)
                new = old - _as_tensor(control[name]).to(self.device) + drift
                delta = (new - old).cpu().numpy().astype(x.dtype, copy=False)
                self._c_local[name] = new
            deltas[SCAFFOLD_DELTA_C + name] = delta
        self._save_control()
        return deltas

    def _load_control(self) -> dict[str, torch.Tensor]:
        if self.state_path is None or not self.state_path.exists():
            return {}
        return {k: torch.from_numpy(v) for k, v in load_file(str(self.state_path)).items()}

    def _save_control(self) -> None:
        if self.state_path is None:
            return
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_name(self.state_path.name + ".tmp")
        save_file({k: v.detach().cpu().numpy() for k, v in self._c_local.items()}, str(tmp))
        os.replace(tmp, self.state_path)

    def _on_device(self, data: TrainData) -> TrainData:
        if _is_tensor_pair(data):
            x, y = data  # type: ignore[misc]
            if len(x) != len(y):
                raise ClientError(f"x has {len(x)} rows but y has {len(y)}")
            return x.to(self.device), y.to(self.device)
        return data

    def _batches(self, data: TrainData, batch_size: int, shuffle: bool) -> Iterator[Batch]:
        if _is_tensor_pair(data):
            x, y = data  # type: ignore[misc]
            yield from iterate_batches(x, y, batch_size, self._generator if shuffle else None)
            return
        for x, y in data:
            yield x.to(self.device), y.to(self.device)


def _is_tensor_pair(data: object) -> bool:
    return (
        isinstance(data, tuple)
        and len(data) == 2
        and all(isinstance(t, torch.Tensor) for t in data)
    )
