"""Weights & Biases (`tracking: {wandb: {project, entity, mode}}`; extra `evomerge[wandb]`).

One W&B run per study, its id kept in RUN_DIR/tracking.json so that a resume and an export
continue it (`resume="allow"`). Per trial: fitness, best so far, per-task metrics, seconds
(records.trial_metrics), charted against `trial`. The export adds recipe.yaml, mergekit.yaml,
report.json and the plots as one artifact, and the held-out table as a W&B Table. Offline runs
are written under RUN_DIR/wandb (or $WANDB_DIR): `wandb sync RUN_DIR/wandb/offline-run-*`
uploads them later. W&B is told not to capture the console, so evomerge's own output is as
without it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.runstore import TrialRecord
from evomerge.tracking.records import trial_metrics
from evomerge.tracking.runs import heldout_table, run_ids, save_run_id

if TYPE_CHECKING:
    from evomerge.config import StudyConfig
    from evomerge.report_model import Report
    from evomerge.tracking.config import WandbConfig

INIT_TIMEOUT = 60.0  # s wandb.init may take to reach W&B before it raises (a tracker is optional)


class WandbSink:
    """The TrialSink and export target for W&B (module docstring)."""

    name = "W&B"

    def __init__(self, cfg: WandbConfig, config: StudyConfig, run_dir: Path) -> None:
        self.cfg = cfg
        self.config = config
        self.run_dir = Path(run_dir)
        self.fix = (
            "`wandb login` (or WANDB_API_KEY), the network, or tracking.wandb.mode: offline "
            "(then `wandb sync`)"
        )
        self._run: Any = None

    def _init(self) -> Any:
        import wandb

        ids = run_ids(self.run_dir)
        run_id = ids.get("wandb") or uuid.uuid4().hex[:8]  # W&B's id form: 8 base-36 chars
        run = wandb.init(
            project=self.cfg.project,
            entity=self.cfg.entity,
            mode=self.cfg.mode,
            id=run_id,
            resume="allow",
            name=self.config.name,
            group=self.config.name,
            job_type="study",
            dir=os.environ.get("WANDB_DIR") or str(self.run_dir),
            settings=wandb.Settings(console="off", silent=True, init_timeout=INIT_TIMEOUT),
        )
        # a resume may raise the budget: the config is updated, not refused as changed
        run.config.update(self.config.model_dump(mode="json"), allow_val_change=True)
        if ids.get("wandb") != run_id:
            save_run_id(self.run_dir, "wandb", run_id)
        run.define_metric("trial")
        run.define_metric("*", step_metric="trial")
        return run

    def start(self, records: Sequence[TrialRecord]) -> None:
        self._run = self._init()

    def trial(self, record: TrialRecord, best: TrialRecord | None) -> None:
        self._run.log(trial_metrics(record, best))
        if best is not None:
            self._run.summary["best_trial"] = best.trial

    def close(self) -> None:
        run, self._run = self._run, None
        if run is not None:
            run.finish()

    def export(self, files: Sequence[Path], out_dir: Path, report: Report) -> None:
        import wandb

        run = self._init()
        try:
            art = wandb.Artifact(
                f"{self.config.name}-export",
                type="model",
                description=f"evomerge export of trial {report.trial.trial} ({out_dir})",
                metadata={"trial": report.trial.trial, "fitness": list(report.trial.fitness)},
            )
            for path in files:
                art.add_file(str(path), name=str(path.relative_to(out_dir)))
            run.log_artifact(art)
            if report.heldout:
                columns, rows = heldout_table(report)
                run.log({"heldout_table": wandb.Table(columns=columns, data=rows)})
                run.summary.update({f"heldout/{r.name}": r.mean for r in report.heldout})
        finally:
            run.finish()
