"""Server-optimizer strategies: FedProx, FedAvgM, FedAdagrad, FedAdam, FedYogi.

Every strategy here streams the round's updates into one
:class:`~strategies.accumulator.WeightedDeltaMean` (O(model) memory) and treats the
example-weighted mean delta ``Δ = mean(local - global)`` as a pseudo-gradient step that a
server optimizer applies to each floating tensor. Integer tensors (e.g. BatchNorm
counters) always take the plain FedAvg result: ``reference + rint(mean delta)`` in their
own dtype.

Rules (``x`` the global model, all buffers start at zero):

- FedProx (Li et al. 2020): the server is FedAvg, ``x <- x + Δ``; sites receive
  ``proximal_mu`` and add ``mu / 2 * ||w - x||^2`` to their local loss.
- FedAvgM (Hsu et al. 2019): ``v <- momentum * v + Δ``; ``x <- x + server_lr * v``.
- FedAdagrad / FedAdam / FedYogi (Reddi et al. 2021, "Adaptive Federated Optimization",
  Algorithm 2): ``m <- beta_1 m + (1 - beta_1) Δ`` and

  - Adagrad: ``v <- v + Δ²``
  - Adam: ``v <- beta_2 v + (1 - beta_2) Δ²``
  - Yogi: ``v <- v - (1 - beta_2) Δ² sign(v - Δ²)``

  then ``x <- x + eta_t * m / (sqrt(v) + tau)``. ``eta_t = eta`` as in the paper;
  FedAdam takes ``bias_correction=True`` for Kingma & Ba's
  ``eta_t = eta * sqrt(1 - beta_2^t) / (1 - beta_1^t)`` with ``t`` the server step
  (1 on the first round).

Numbers: moment buffers have the dtype of their tensor promoted to at least float32
(float32 for a float32 model), and every scalar is a Python float, so float32 stays
float32 (no NumPy 2 promotion through ``np.float64`` scalars).

Differences from Flower 1.41 (``flwr.server.strategy``), all covered by oracle tests:

- Defaults: Flower's FedAdam uses ``eta=0.1, tau=1e-9`` and FedAdagrad
  ``eta=0.1, tau=1e-9``; here all three adaptive rules default to ``eta=1e-2, tau=1e-3``
  (the paper's robust choice of tau; ``tau=1e-9`` makes each step ~``eta * sign(Δ)``).
  FedYogi's defaults equal Flower's. Flower's ``eta_l`` (client learning rate) is not a
  server parameter here: the client learning rate is ``training.optimizer.lr``.
- Flower's FedAdam always bias-corrects, with an off-by-one exponent
  (``beta^(server_round + 1)``, i.e. ``beta^2`` on the first round); ours follows the
  paper (no correction) unless ``bias_correction=True`` (exponent ``t``).
- Flower's FedAvgM keeps the negated momentum (``x - server_lr * v`` with pseudo-gradient
  ``x - avg``); the resulting models are the same.
- Flower applies its rules to integer tensors too (and returns them as floats); here they
  take FedAvg in their own dtype.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Mapping
from typing import Annotated, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from strategies.accumulator import WeightedDeltaMean
from strategies.base import Arrays, ConfigValue, Strategy

STEP_KEY = "step"

PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
UnitFloat = Annotated[float, Field(ge=0, lt=1)]


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


def _buffer_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype of a moment buffer for a floating tensor of ``dtype`` (>= float32)."""
    return np.promote_types(dtype, np.float32)


class ServerOptimizer(Strategy):
    """Base of the server-optimizer strategies: FedAvg for integer tensors, a per-tensor
    server rule for floating ones, and named moment buffers persisted with the round.

    Subclasses list their buffers in :attr:`buffers` and implement :meth:`_float_step`.
    State: ``"<buffer>/<tensor>"`` arrays and, when there are buffers, ``"step"`` (a 0-d
    int64 array counting applied rounds).
    """

    supports_dp = True
    supports_secagg = True

    buffers: ClassVar[tuple[str, ...]] = ()

    def __init__(self, params: BaseModel | None = None):
        super().__init__(params)
        self._buf: dict[str, dict[str, np.ndarray]] = {b: {} for b in self.buffers}
        self._step = 0

    def aggregator(self, reference: Arrays, expected: int) -> WeightedDeltaMean:
        return WeightedDeltaMean(reference)

    def apply(self, model: Arrays, aggregator: WeightedDeltaMean) -> dict[str, np.ndarray]:  # type: ignore[override]
        delta = aggregator.mean()
        self._prepare_buffers(model)
        self._step += 1
        out: dict[str, np.ndarray] = {}
        for name, x in model.items():
            if x.dtype.kind == "f":
                d = delta[name].astype(_buffer_dtype(x.dtype), copy=False)
                out[name] = (x + self._float_step(name, d)).astype(x.dtype, copy=False)
            else:
                out[name] = (x + delta[name]).astype(x.dtype, copy=False)
        return out

    def _float_step(self, name: str, delta: np.ndarray) -> np.ndarray:
        """The server step added to floating tensor ``name`` (FedAvg: the mean delta)."""
        return delta

    # -- moment buffers -------------------------------------------------------------

    def _prepare_buffers(self, model: Arrays) -> None:
        """Create zero buffers on the first round; check restored ones against ``model``."""
        if not self.buffers:
            return
        floats = {k: v for k, v in model.items() if v.dtype.kind == "f"}
        for buffer, arrays in self._buf.items():
            if not arrays:
                self._buf[buffer] = {
                    k: np.zeros(v.shape, dtype=_buffer_dtype(v.dtype)) for k, v in floats.items()
                }
                continue
            if set(arrays) != set(floats):
                raise ValueError(
                    f"{self.name} state does not match the model: buffer {buffer!r} holds "
                    f"{sorted(set(arrays) ^ set(floats))[:3]} differently"
                )
            for k, v in floats.items():
                if arrays[k].shape != v.shape or arrays[k].dtype != _buffer_dtype(v.dtype):
                    raise ValueError(
                        f"{self.name} state {buffer}/{k}: {arrays[k].dtype}{arrays[k].shape} "
                        f"does not fit tensor {v.dtype}{v.shape}"
                    )

    def state(self) -> dict[str, np.ndarray]:
        """Copies of the buffers as ``"<buffer>/<tensor>"`` plus ``"step"`` (0-d int64)."""
        if not self.buffers:
            return {}
        out = {
            f"{buffer}/{k}": v.copy()
            for buffer, arrays in self._buf.items()
            for k, v in arrays.items()
        }
        out[STEP_KEY] = np.array(self._step, dtype=np.int64)
        return out

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore :meth:`state` exactly (an empty mapping resets to a fresh optimizer).

        Raises
        ------
        ValueError
            On unknown names, a missing or invalid ``step``, non-floating buffers, or
            buffers that disagree on tensor names or shapes.
        """
        if not self.buffers:
            super().load_state(state)
            return
        if not state:
            self._buf = {b: {} for b in self.buffers}
            self._step = 0
            return
        step = self._parse_step(state)
        loaded: dict[str, dict[str, np.ndarray]] = {b: {} for b in self.buffers}
        for key, value in state.items():
            if key == STEP_KEY:
                continue
            buffer, _, tensor = key.partition("/")
            if buffer not in loaded or not tensor:
                raise ValueError(f"{self.name} state: unknown entry {key!r}")
            value = np.asarray(value)
            if value.dtype.kind != "f":
                raise ValueError(f"{self.name} state {key!r}: dtype {value.dtype} is not floating")
            loaded[buffer][tensor] = value.copy()
        self._check_consistent(loaded)
        self._buf = loaded
        self._step = step

    def _parse_step(self, state: Mapping[str, np.ndarray]) -> int:
        if STEP_KEY not in state:
            raise ValueError(f"{self.name} state: missing {STEP_KEY!r}")
        step = np.asarray(state[STEP_KEY])
        if step.shape != () or step.dtype.kind not in "iu" or int(step) < 0:
            raise ValueError(f"{self.name} state: {STEP_KEY!r} must be a 0-d count >= 0")
        return int(step)

    def _check_consistent(self, loaded: Mapping[str, Mapping[str, np.ndarray]]) -> None:
        first, *rest = self.buffers
        for buffer in rest:
            if set(loaded[buffer]) != set(loaded[first]):
                raise ValueError(
                    f"{self.name} state: buffers {first!r} and {buffer!r} hold different tensors"
                )
            for k, v in loaded[buffer].items():
                ref = loaded[first][k]
                if v.shape != ref.shape or v.dtype != ref.dtype:
                    raise ValueError(f"{self.name} state: {first}/{k} and {buffer}/{k} differ")


# -- FedProx ------------------------------------------------------------------------


class FedProxParams(_Params):
    """``mu``: weight of the proximal term ``mu / 2 * ||w - w_global||^2`` at sites."""

    mu: NonNegativeFloat = 0.01


class FedProx(ServerOptimizer):
    """FedProx (Li et al. 2020): FedAvg on the server, a proximal term at the sites."""

    name = "fedprox"
    Params = FedProxParams

    def fit_config(self, round_no: int) -> dict[str, ConfigValue]:
        return {"proximal_mu": float(self.params.mu)}


# -- FedAvgM ------------------------------------------------------------------------


class FedAvgMParams(_Params):
    """``server_lr``: server learning rate; ``momentum``: server momentum in [0, 1)."""

    server_lr: PositiveFloat = 1.0
    momentum: UnitFloat = 0.9


class FedAvgM(ServerOptimizer):
    """FedAvgM (Hsu et al. 2019): ``v <- momentum v + Δ``; ``x <- x + server_lr v``."""

    name = "fedavgm"
    Params = FedAvgMParams
    buffers = ("momentum",)

    def _float_step(self, name: str, delta: np.ndarray) -> np.ndarray:
        v = self._buf["momentum"][name]
        v *= float(self.params.momentum)
        v += delta
        return float(self.params.server_lr) * v


# -- adaptive family (Reddi et al. 2021) ---------------------------------------------


class FedAdagradParams(_Params):
    """``eta``: server lr; ``beta_1``: first-moment decay; ``tau``: adaptivity."""

    eta: PositiveFloat = 1e-2
    beta_1: UnitFloat = 0.0
    tau: PositiveFloat = 1e-3


class FedAdamParams(_Params):
    """As :class:`FedAdagradParams` plus ``beta_2`` (second-moment decay)."""

    eta: PositiveFloat = 1e-2
    beta_1: UnitFloat = 0.9
    beta_2: UnitFloat = 0.99
    tau: PositiveFloat = 1e-3
    bias_correction: bool = False


class FedYogiParams(_Params):
    """As :class:`FedAdamParams`, without bias correction."""

    eta: PositiveFloat = 1e-2
    beta_1: UnitFloat = 0.9
    beta_2: UnitFloat = 0.99
    tau: PositiveFloat = 1e-3


class AdaptiveServerOptimizer(ServerOptimizer):
    """``m <- beta_1 m + (1 - beta_1) Δ``; ``v`` by :meth:`_update_v`;
    ``x <- x + eta_t m / (sqrt(v) + tau)``."""

    buffers = ("m", "v")

    @abstractmethod
    def _update_v(self, v: np.ndarray, delta_sq: np.ndarray) -> None:
        """Update the second moment ``v`` in place from ``Δ²`` (which it may overwrite)."""

    def _step_size(self) -> float:
        """``eta_t`` for the current step (the paper: constant ``eta``)."""
        return float(self.params.eta)

    def _float_step(self, name: str, delta: np.ndarray) -> np.ndarray:
        beta_1 = float(self.params.beta_1)
        m = self._buf["m"][name]
        v = self._buf["v"][name]
        m *= beta_1
        m += (1.0 - beta_1) * delta
        self._update_v(v, np.square(delta))
        denom = np.sqrt(v)
        denom += float(self.params.tau)
        step = np.divide(m, denom, out=denom)
        step *= self._step_size()
        return step


class FedAdagrad(AdaptiveServerOptimizer):
    """FedAdagrad: ``v <- v + Δ²``."""

    name = "fedadagrad"
    Params = FedAdagradParams

    def _update_v(self, v: np.ndarray, delta_sq: np.ndarray) -> None:
        v += delta_sq


class FedAdam(AdaptiveServerOptimizer):
    """FedAdam: ``v <- beta_2 v + (1 - beta_2) Δ²``; optional Kingma & Ba bias correction."""

    name = "fedadam"
    Params = FedAdamParams

    def _update_v(self, v: np.ndarray, delta_sq: np.ndarray) -> None:
        beta_2 = float(self.params.beta_2)
        v *= beta_2
        delta_sq *= 1.0 - beta_2
        v += delta_sq

    def _step_size(self) -> float:
        eta = float(self.params.eta)
        if not self.params.bias_correction:
            return eta
        t = self._step
        beta_1, beta_2 = float(self.params.beta_1), float(self.params.beta_2)
        return eta * math.sqrt(1.0 - beta_2**t) / (1.0 - beta_1**t)


class FedYogi(AdaptiveServerOptimizer):
    """FedYogi: ``v <- v - (1 - beta_2) Δ² sign(v - Δ²)``."""

    name = "fedyogi"
    Params = FedYogiParams

    def _update_v(self, v: np.ndarray, delta_sq: np.ndarray) -> None:
        change = np.sign(v - delta_sq)
        change *= delta_sq
        change *= 1.0 - float(self.params.beta_2)
        v -= change
