"""The site's side of inclusion receipts: which it is owed, asking for them, checking them.

After an update (or, under secure aggregation, a masked vector) is accepted, the site
expects a receipt for that round. Between polls it asks ``Fleet.GetReceipt``; once the
round has committed, it checks the receipt against the pinned coordinator key and what
it sent itself, and keeps the outcome: in memory (:attr:`ReceiptBook.records`) and, with
a path, as one JSON line per receipt. A bad receipt is logged and recorded, never raised.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from client_sdk.errors import SiteError
from protos.fedcoord.v1 import fleet_pb2, fleet_pb2_grpc
from protos.receipts import (
    PUBLIC_KEY_BYTES,
    Receipt,
    ReceiptError,
    receipt_from_reply,
    verify_receipt,
)

log = logging.getLogger("fedcoord.site.receipts")

MAX_WAIT_S = 3600.0
"""Give up on a receipt whose round has not committed after this long."""
FIRST_DELAY_S = 1.0
MAX_DELAY_S = 30.0
MAX_PENDING = 1024
"""Rounds owed at once; the oldest is dropped beyond this (a site far behind)."""
ASK_TIMEOUT_S = 10.0


def fingerprint(key: bytes) -> str:
    """A short name of a coordinator key for logs."""
    return hashlib.sha256(key).hexdigest()[:16]


def read_pinned_key(path: Path) -> bytes:
    """The coordinator key kept in ``path``; raises :class:`SiteError` naming the file."""
    text = path.read_text(encoding="ascii", errors="replace").strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != PUBLIC_KEY_BYTES:
        raise SiteError(
            f"{path} does not hold a coordinator key ({PUBLIC_KEY_BYTES} bytes in hex); "
            "delete it to pin the key the coordinator presents next"
        )
    return key


def write_pinned_key(path: Path, key: bytes) -> None:
    """Keep ``key`` in ``path`` whole or not at all (a crash leaves the old file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="ascii") as f:
        f.write(key.hex() + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass
class Owed:
    """A round this site sent an accepted update to and expects a receipt for."""

    run_id: str
    round: int
    digests: set[str]
    since: float
    next_ask: float = 0.0
    delay: float = FIRST_DELAY_S


@dataclass
class ReceiptBook:
    """The receipts one site is owed and has received.

    Parameters
    ----------
    site_id
        This site.
    pinned_key
        The coordinator's raw Ed25519 key, pinned by the operator; None: trust the key
        of the first enrollment.
    path
        Append each outcome here as one JSON line (None: keep them in memory only).
    pin_path
        Keep the key pinned on first use here (hex, one line) and start from it, so a
        restarted site still refuses another key (None: the pin lasts this process).
        An operator's ``pinned_key`` takes precedence and is not written.
    """

    site_id: str
    pinned_key: bytes | None = None
    path: Path | None = None
    pin_path: Path | None = None
    max_wait_s: float = MAX_WAIT_S
    records: list[dict[str, Any]] = field(default_factory=list)
    owed: dict[tuple[str, int], Owed] = field(default_factory=dict)
    latest_round: dict[str, int] = field(default_factory=dict)
    enabled: bool = True

    def __post_init__(self) -> None:
        if self.pinned_key is not None and len(self.pinned_key) != PUBLIC_KEY_BYTES:
            raise ValueError("coordinator_public_key must be 32 raw Ed25519 bytes")
        if self.pinned_key is None and self.pin_path is not None and self.pin_path.exists():
            self.pinned_key = read_pinned_key(self.pin_path)

    # what the connection loop tells us ----------------------------------------------
    def pin(self, key: bytes) -> None:
        """The key an enrollment reply presents: pinned on first use, compared after."""
        if not key:
            if self.pinned_key is None:
                log.warning(
                    "site %s: the coordinator presents no signing key; its receipts cannot "
                    "be verified",
                    self.site_id,
                )
            return
        if len(key) != PUBLIC_KEY_BYTES:
            log.error("site %s: the coordinator presents a malformed signing key", self.site_id)
            return
        if self.pinned_key is None:
            self.pinned_key = bytes(key)
            if self.pin_path is not None:
                write_pinned_key(self.pin_path, self.pinned_key)
            log.info(
                "site %s: pinned coordinator key %s (trust on first use%s)",
                self.site_id,
                fingerprint(key),
                "" if self.pin_path is None else f", kept in {self.pin_path}",
            )
        elif key != self.pinned_key:
            log.error(
                "site %s: !!! THE COORDINATOR PRESENTS A DIFFERENT SIGNING KEY %s, NOT THE "
                "PINNED %s; receipts signed by it will be refused !!!",
                self.site_id,
                fingerprint(key),
                fingerprint(self.pinned_key),
            )

    def expect(self, run_id: str, round_no: int, digest: str, now: float | None = None) -> None:
        """An accepted update of ``digest`` for this round (a redone round adds one)."""
        if not (self.enabled and run_id and round_no > 0 and digest):
            return
        now = time.time() if now is None else now
        owed = self.owed.get((run_id, round_no))
        if owed is None:
            if len(self.owed) >= MAX_PENDING:
                oldest = min(self.owed, key=lambda k: self.owed[k].since)
                self._settle(self.owed[oldest], "unconfirmed", None, "too many receipts owed")
            first_ask = now + FIRST_DELAY_S  # asked at once, it would nearly always be pending
            self.owed[(run_id, round_no)] = Owed(run_id, round_no, {digest}, now, first_ask)
        else:
            owed.digests.add(digest)

    def saw_round(self, run_id: str, round_no: int) -> None:
        """A task of ``round_no`` arrived: any earlier round of the run has committed."""
        if round_no > self.latest_round.get(run_id, 0):
            self.latest_round[run_id] = round_no

    # asking ---------------------------------------------------------------------------
    def poll(self, stub: fleet_pb2_grpc.FleetStub, now: float | None = None) -> None:
        """Ask for every receipt that is due (its time came, or a later round of its run
        started, so it has committed); never raises."""
        now = time.time() if now is None else now
        due = [o for o in self.owed.values() if o.next_ask <= now or self._superseded(o)]
        for owed in due:
            try:
                if not self._ask(stub, owed, now):
                    return  # the coordinator is unreachable: try again on a later poll
            except Exception as exc:  # a site keeps running whatever a receipt holds
                log.exception("site %s round %d: receipt check failed", self.site_id, owed.round)
                self._settle(owed, "invalid", None, f"{type(exc).__name__}: {exc}")

    def _superseded(self, owed: Owed) -> bool:
        return self.latest_round.get(owed.run_id, 0) > owed.round

    def _ask(self, stub: fleet_pb2_grpc.FleetStub, owed: Owed, now: float) -> bool:
        """One ``GetReceipt``; False when the call failed."""
        request = fleet_pb2.ReceiptRequest(
            site_id=self.site_id, run_id=owed.run_id, round=owed.round
        )
        try:
            reply = stub.GetReceipt(request, timeout=ASK_TIMEOUT_S)
        except ValueError:  # the site is stopping: its channel was closed
            return False
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                log.warning(
                    "site %s: the coordinator does not issue inclusion receipts", self.site_id
                )
                self.enabled = False
                for o in list(self.owed.values()):
                    self._settle(o, "unconfirmed", None, "coordinator issues no receipts")
                return False
            owed.next_ask = now + owed.delay
            owed.delay = min(2 * owed.delay, MAX_DELAY_S)
            log.debug("site %s: GetReceipt failed: %s", self.site_id, exc.code())
            return False
        if reply.status == fleet_pb2.RECEIPT_STATUS_PENDING:
            later = self._superseded(owed)
            if later or now - owed.since > self.max_wait_s:
                why = (
                    "a later round started"
                    if later
                    else f"not committed after {self.max_wait_s:.0f}s"
                )
                log.warning(
                    "site %s round %d: no receipt (%s); giving up",
                    self.site_id,
                    owed.round,
                    why,
                )
                self._settle(owed, "unconfirmed", None, f"still pending: {why}")
            else:
                owed.next_ask = now + owed.delay
                owed.delay = min(2 * owed.delay, MAX_DELAY_S)
            return True
        receipt: Receipt | None = None
        try:
            receipt = receipt_from_reply(reply)
            statement = self.check(receipt, owed)
        except ReceiptError as exc:
            log.error(
                "site %s round %d: INVALID inclusion receipt from the coordinator: %s",
                self.site_id,
                owed.round,
                exc,
            )
            self._settle(owed, "invalid", receipt, str(exc))
            return True
        model, seq = statement["output_model"], statement["ledger_seq"]
        if receipt.included:
            log.info(
                "site %s round %d: inclusion in model %s verified (ledger entry %d)",
                self.site_id,
                owed.round,
                model,
                seq,
            )
            self._settle(owed, "included", receipt, None)
        else:
            log.warning(
                "site %s round %d: update NOT included in model %s; exclusion verified "
                "(ledger entry %d)",
                self.site_id,
                owed.round,
                model,
                seq,
            )
            self._settle(owed, "excluded", receipt, None)
        return True

    def check(self, receipt: Receipt, owed: Owed) -> dict[str, Any]:
        """Verify ``receipt`` with the pinned key and against what this site sent."""
        if self.pinned_key is None:
            raise ReceiptError("no coordinator key is pinned; cannot verify receipts")
        statement = verify_receipt(receipt, self.pinned_key)
        for key, want in (("run_id", owed.run_id), ("round", owed.round),
                          ("site_id", self.site_id)):  # fmt: skip
            if statement[key] != want:
                raise ReceiptError(f"receipt is for {key} {statement[key]!r}, not {want!r}")
        if receipt.included and statement["update_digest"] not in owed.digests:
            raise ReceiptError(
                f"receipt names update {statement['update_digest']}, which this site never sent"
            )
        return statement

    # keeping ---------------------------------------------------------------------------
    def _settle(self, owed: Owed, outcome: str, receipt: Receipt | None, error: str | None) -> None:
        self.owed.pop((owed.run_id, owed.round), None)
        record = {
            "site_id": self.site_id,
            "run_id": owed.run_id,
            "round": owed.round,
            "outcome": outcome,
            "verified": outcome in ("included", "excluded"),
            "error": error,
            "sent_digests": sorted(owed.digests),
            "receipt": receipt.to_json() if receipt is not None else None,
            "time": time.time(),
        }
        self.records.append(record)
        if self.path is None:
            return
        try:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record, sort_keys=True) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            log.error("site %s: cannot write receipt to %s: %s", self.site_id, self.path, exc)
