"""MLflow (`tracking: {mlflow: {tracking_uri, experiment}}`; extra `evomerge[mlflow]`).

One MLflow run per study in the experiment (default: the study's name), its id kept in
RUN_DIR/tracking.json so that a resume and an export log to the same run. Per trial, one
`log_batch` of fitness, best so far, per-task metrics and seconds (records.trial_metrics) at
step = trial number. The export logs recipe.yaml, mergekit.yaml, report.json and the plots as
artifacts under `export/`, the held-out table as `export/heldout_table.json` and each row's
held-out mean as a metric. Uses `MlflowClient` with the given URI, never MLflow's global active
run, so nothing else in the process is affected. A server that does not answer fails after
MLflow's own retries (MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_TIMEOUT).
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.runstore import TrialRecord
from evomerge.tracking.records import trial_metrics
from evomerge.tracking.runs import heldout_table, run_ids, save_run_id

if TYPE_CHECKING:
    from evomerge.config import StudyConfig
    from evomerge.report_model import Report
    from evomerge.tracking.config import MlflowConfig

_BAD_KEY = re.compile(r"[^\w\-. :/]")  # MLflow's metric names: alphanumerics, _ - . space : /


def metric_key(name: str) -> str:
    return _BAD_KEY.sub("_", name)


class MlflowSink:
    """The TrialSink and export target for MLflow (module docstring)."""

    name = "MLflow"

    def __init__(self, cfg: MlflowConfig, config: StudyConfig, run_dir: Path) -> None:
        self.cfg = cfg
        self.config = config
        self.run_dir = Path(run_dir)
        where = cfg.tracking_uri or "$MLFLOW_TRACKING_URI"
        self.fix = f"that the MLflow tracking server at {where} is reachable and writable"
        self._client: Any = None
        self._run_id: str | None = None

    def _open(self) -> tuple[Any, str]:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.cfg.tracking_uri)
        name = self.cfg.experiment or self.config.name
        exp = client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp is not None else client.create_experiment(name)
        run_id = run_ids(self.run_dir).get("mlflow")
        if run_id is not None:
            try:
                if client.get_run(run_id).info.experiment_id == exp_id:
                    client.update_run(run_id, status="RUNNING")
                    return client, run_id
            except MlflowException:  # deleted, or another tracking server now
                pass
        run = client.create_run(
            exp_id,
            run_name=self.config.name,
            tags={
                "evomerge.run_dir": str(self.run_dir),
                "evomerge.optimizer": self.config.optimizer.name,
            },
        )
        run_id = run.info.run_id
        save_run_id(self.run_dir, "mlflow", run_id)
        client.log_text(run_id, self.config.to_yaml(), "study.yaml")
        params = {
            "optimizer": self.config.optimizer.name,
            "max_trials": self.config.budget.max_trials,
            "seed": self.config.seed,
            "fidelity": self.config.fitness.fidelity,
            "search_tasks": ",".join(self.config.tasks.search),
        }
        client.log_batch(run_id, params=[_param(k, v) for k, v in params.items()])
        return client, run_id

    def start(self, records: Sequence[TrialRecord]) -> None:
        self._client, self._run_id = self._open()

    def trial(self, record: TrialRecord, best: TrialRecord | None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [
            Metric(metric_key(k), v, now, record.trial)
            for k, v in trial_metrics(record, best).items()
            if k != "trial"
        ]
        self._client.log_batch(self._run_id, metrics=metrics)

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None and self._run_id is not None:
            client.set_terminated(self._run_id, "FINISHED")

    def export(self, files: Sequence[Path], out_dir: Path, report: Report) -> None:
        from mlflow.entities import Metric

        client, run_id = self._open()
        try:
            for path in files:
                rel = path.relative_to(out_dir).parent
                client.log_artifact(run_id, str(path), str(Path("export") / rel))
            if report.heldout:
                columns, rows = heldout_table(report)
                client.log_dict(
                    run_id, {"columns": columns, "data": rows}, "export/heldout_table.json"
                )
                now = int(time.time() * 1000)
                metrics = [
                    Metric(metric_key(f"heldout/{r.name}"), r.mean, now, 0)
                    for r in report.heldout
                    if r.mean is not None
                ]
                client.log_batch(run_id, metrics=metrics)
        finally:
            client.set_terminated(run_id, "FINISHED")


def _param(key: str, value: Any) -> Any:
    from mlflow.entities import Param

    return Param(key, str(value)[:500])
