"""Content-addressed model versions: ``models/sha256/<aa>/<hex>.safetensors``.

A model is named by its payload digest (:func:`protos.codec.digest_arrays`), the same
digest the wire and the ledger use. Files are written to a temporary name, fsynced and
renamed, so a crash never leaves a partial model under a valid name.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from coordinator.errors import LedgerError
from protos.codec import DIGEST_PREFIX, digest_arrays


class ModelStore:
    def __init__(self, root: Path):
        self.root = root

    def path(self, digest: str) -> Path:
        hexd = digest.removeprefix(DIGEST_PREFIX)
        if len(hexd) != 64 or any(c not in "0123456789abcdef" for c in hexd):
            raise ValueError(f"not a model digest: {digest!r}")
        return self.root / "sha256" / hexd[:2] / f"{hexd}.safetensors"

    def exists(self, digest: str) -> bool:
        return self.path(digest).exists()

    def put(self, arrays: Mapping[str, np.ndarray], digest: str) -> Path:
        """Store ``arrays`` (whose payload digest the caller computed) durably; idempotent."""
        path = self.path(digest)
        if path.exists():
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file(dict(arrays), str(tmp), metadata={"fedcoord_digest": digest})
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return path

    def add(self, arrays: Mapping[str, np.ndarray]) -> str:
        """Store ``arrays`` under their payload digest, which is returned."""
        digest = digest_arrays(arrays)
        self.put(arrays, digest)
        return digest

    def get(self, digest: str) -> dict[str, np.ndarray]:
        return load_file(str(self.path(digest)))

    def verify(self, digest: str) -> None:
        """Raise :class:`LedgerError` unless the file exists and its content has ``digest``."""
        path = self.path(digest)
        if not path.exists():
            raise LedgerError(f"model {digest} is missing ({path})")
        try:
            arrays = load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types on corrupt files
            raise LedgerError(f"model file {path} is unreadable: {exc}") from None
        actual = digest_arrays(arrays)
        if actual != digest:
            raise LedgerError(f"model file {path} has digest {actual}, not {digest} (file edited)")
