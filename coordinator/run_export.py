"""What the round engine sends to MLflow about one run (through :class:`MlflowExporter`,
so nothing here waits on MLflow but :meth:`RunExport.finish` at the run's end)."""

from __future__ import annotations

import json
from typing import Any

from coordinator.experiment import Experiment
from coordinator.mlflow_export import MlflowExporter
from coordinator.state import Database

CLOSE_TIMEOUT_S = 120.0
"""How long the end of a run waits for the export queue to drain."""


class RunExport:
    """The MLflow side of one run: started (or found again) when the run starts or
    resumes, fed every committed round, and given the model when the run ends."""

    def __init__(self, db: Database, run_id: str, exp: Experiment):
        assert exp.mlflow is not None
        self.db, self.run_id, self.exp = db, run_id, exp
        self.exporter = MlflowExporter(exp.mlflow, exp.name)
        self.exporter.start_run(
            run_id,
            json.loads(exp.canonical_json()),
            {"fedcoord.config_digest": exp.config_digest(), "fedcoord.experiment": exp.name},
        )

    def round(self, round_no: int, metrics: dict[str, float]) -> None:
        self.exporter.log_round(round_no, metrics)

    def finish(self, status: str) -> None:
        """Log the promoted model of the run (alias ``champion``), or else its final
        model, with provenance tags; end the MLflow run and drain the queue."""
        row = self.db.run(self.run_id)
        if row is not None and row.model_digest and row.rounds_completed:
            promoted, digest = self._promoted()
            digest = digest or row.model_digest
            self.exporter.log_model(
                self.db.models.path(digest), digest, self._tags(row.rounds_completed, digest),
                champion=promoted,
            )  # fmt: skip
        self.exporter.finish(status)
        self.exporter.close(CLOSE_TIMEOUT_S)

    def _promoted(self) -> tuple[bool, str | None]:
        """Whether a version of this run is champion, and which (the latest decision)."""
        for entry in reversed(self.db.ledger_entries()):
            if entry.kind == "model_promoted" and entry.payload.get("run_id") == self.run_id:
                return True, str(entry.payload["model"])
        return False, None

    def _tags(self, rounds: int, digest: str) -> dict[str, str]:
        sites: set[str] = set()
        epsilon: Any = None
        for entry in self.db.ledger_entries():
            p = entry.payload
            if entry.kind == "round_committed" and p.get("run_id") == self.run_id:
                sites.update(p.get("participants") or ())
                epsilon = (p.get("metrics") or {}).get("epsilon", epsilon)
        secagg = self.exp.privacy.secure_aggregation.enabled
        return {
            "fedcoord.run_id": self.run_id,
            "fedcoord.ledger_head": self.db.ledger_head(),
            "fedcoord.model_digest": digest,
            "fedcoord.sites": str(len(sites)),
            "fedcoord.rounds": str(rounds),
            "fedcoord.epsilon": "none" if epsilon is None else f"{epsilon:.6g}",
            "fedcoord.secure_aggregation": "secagg+" if secagg else "off",
        }
