"""Secure aggregation numerics, no I/O: the coordinator learns only the sum of a round's
updates, even while sites drop out (Bonawitz et al. 2017 over the SecAgg+ graph of Bell
et al. 2020).

Modules, one job each: :mod:`.quantize` (fixed-point encoding in ``Z_{2^b}``),
:mod:`.prg` (AES-256-CTR mask expansion), :mod:`.shamir` (vectorised t-of-n sharing),
:mod:`.keys` (X25519, HKDF, AES-GCM), :mod:`.graph` (Harary graph), :mod:`.params`
(choice of ``k`` and ``t``), :mod:`.messages` (stage messages), :mod:`.protocol` (rules
shared by both ends), :mod:`.client` and :mod:`.server` (the state machines),
:mod:`.errors`.
"""

from strategies.secagg.client import SecAggClient
from strategies.secagg.errors import (
    DuplicatePublicKey,
    InvalidMessage,
    InvalidPublicKey,
    ProtocolViolation,
    QuantizationOverflow,
    ReconstructionError,
    SecAggAborted,
    SecAggError,
    ShamirError,
    ShareDecryptionError,
)
from strategies.secagg.params import SecAggParameters, choose_parameters
from strategies.secagg.quantize import (
    QuantizationConfig,
    Quantized,
    check_no_overflow,
    dequantize_sum,
    error_bound,
    quantize,
)
from strategies.secagg.server import SecAggServer

__all__ = [
    "DuplicatePublicKey",
    "InvalidMessage",
    "InvalidPublicKey",
    "ProtocolViolation",
    "QuantizationConfig",
    "QuantizationOverflow",
    "Quantized",
    "ReconstructionError",
    "SecAggAborted",
    "SecAggClient",
    "SecAggError",
    "SecAggParameters",
    "SecAggServer",
    "ShamirError",
    "ShareDecryptionError",
    "check_no_overflow",
    "choose_parameters",
    "dequantize_sum",
    "error_bound",
    "quantize",
]
