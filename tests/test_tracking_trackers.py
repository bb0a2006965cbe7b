"""Experiment trackers: W&B (offline files) and MLflow (a local file store), real libraries read
back with their own APIs; a tracker that fails warns once and changes nothing; off, neither is
imported."""

from __future__ import annotations

import json
import logging
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from evomerge.cli import main
from evomerge.runstore import RunStore
from tests.study_factory import make_tiny_study, trial_sequence, with_changes

wandb = pytest.importorskip("wandb")
mlflow = pytest.importorskip("mlflow")

TRACKERS = ("wandb", "mlflow")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("trackers")
    make_tiny_study(root, max_trials=5)
    with_changes(
        root,
        "tracked",
        tracking={
            "wandb": {"project": "evomerge-test", "mode": "offline"},
            "mlflow": {"tracking_uri": (root / "mlruns").as_uri(), "experiment": "exp"},
        },
    )
    with_changes(
        root,
        "failing",
        tracking={"mlflow": {"tracking_uri": f"http://127.0.0.1:{_closed_port()}"}},
    )
    return root


@pytest.fixture(autouse=True)
def tracker_env(root, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(root / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for the opt-in
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    (root / "wandb_dir").mkdir(exist_ok=True)


@pytest.fixture(scope="module")
def plain_run(root, tmp_path_factory) -> tuple[Path, list[str]]:
    """The study with tracking off, in a fresh interpreter: its run dir, and the tracker
    modules that interpreter had imported by the end."""
    out = tmp_path_factory.mktemp("plain")
    code = (
        "import sys; from evomerge.cli import main; "
        f"assert main(['run', {str(root / 'study.yaml')!r}, '--runs-dir', {str(out)!r}, "
        "'--quiet']) == 0; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('wandb', 'mlflow')))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=root
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "tiny", json.loads(proc.stdout.strip().splitlines()[-1].replace("'", '"'))


@pytest.fixture(scope="module")
def tracked_run(root, tmp_path_factory, plain_run) -> Path:
    out = tmp_path_factory.mktemp("tracked")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_DIR", str(root / "wandb_dir"))
        mp.setenv("WANDB_SILENT", "true")
        mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        (root / "wandb_dir").mkdir(exist_ok=True)
        assert main(["run", str(root / "tracked.yaml"), "--runs-dir", str(out), "--quiet"]) == 0
    return out / "tiny"


def test_tracking_off_imports_no_tracker(plain_run):
    run_dir, imported = plain_run
    assert imported == []
    assert len(RunStore(run_dir).read_trials()) == 5


# ---------------------------------------------------------------- W&B's own files
def wandb_records(path: Path) -> list:
    """The records of a .wandb file (W&B's LevelDB-style log of wandb_internal_pb2.Record
    protobufs: a 7-byte header, 32 KiB blocks of CRC32, length, type, payload chunks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf, out = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += block - pos % block
            continue
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def wandb_history(path: Path) -> list[dict]:
    rows = []
    for rec in wandb_records(path):
        if rec.WhichOneof("record_type") == "history":
            rows.append(
                {
                    (i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                    for i in rec.history.item
                }
            )
    return rows


def wandb_files(root: Path, run_id: str) -> list[Path]:
    return sorted((root / "wandb_dir" / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))


def test_wandb_offline_logs_every_trial(root, tracked_run, plain_run):
    records = RunStore(tracked_run).read_trials()
    assert trial_sequence(tracked_run) == trial_sequence(plain_run[0])  # tracking changes nothing
    run_id = json.loads((tracked_run / "tracking.json").read_text())["wandb"]
    (study_file, *_) = wandb_files(root, run_id)
    rows = [r for r in wandb_history(study_file) if "fitness" in r]
    assert [r["trial"] for r in rows] == [r.trial for r in records]
    assert [r["fitness"] for r in rows] == pytest.approx([r.fitness[0] for r in records])
    running = [max(r.fitness[0] for r in records[: i + 1]) for i in range(len(records))]
    assert [r["best_fitness"] for r in rows] == pytest.approx(running)
    assert [r["tiny_search/acc"] for r in rows] == pytest.approx(
        [r.scores["tiny_search"]["acc"] for r in records]
    )
    assert all(
        r["seconds/total"] == rec.seconds["total"] for r, rec in zip(rows, records, strict=True)
    )


def test_mlflow_file_store_logs_every_trial(root, tracked_run):
    from mlflow.tracking import MlflowClient

    records = RunStore(tracked_run).read_trials()
    client = MlflowClient(tracking_uri=(root / "mlruns").as_uri())
    run_id = json.loads((tracked_run / "tracking.json").read_text())["mlflow"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["optimizer"] == "cma"
    assert client.get_experiment(run.info.experiment_id).name == "exp"
    history = sorted(client.get_metric_history(run_id, "fitness"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in history] == [(r.trial, r.fitness[0]) for r in records]
    best = sorted(client.get_metric_history(run_id, "best_fitness"), key=lambda m: m.step)
    assert best[-1].value == max(r.fitness[0] for r in records)
    acc = client.get_metric_history(run_id, "tiny_search/acc")
    assert len(acc) == len(records)


def test_export_sends_artifacts_and_heldout_table(root, tracked_run, tmp_path):
    from mlflow.tracking import MlflowClient

    from evomerge.export import export_run
    from evomerge.tracking.mlflow_sink import metric_key

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        result = export_run(tracked_run, tmp_path / "export", progress=False)
    report = result.report
    assert report.heldout, "the tiny study has a held-out task"
    expected = {"recipe.yaml", "report.json"} | (
        {"mergekit.yaml"} if result.mergekit_written else set()
    )
    # MLflow: artifacts of the study's run, the table as JSON, the held-out means as metrics
    client = MlflowClient(tracking_uri=(root / "mlruns").as_uri())
    run_id = json.loads((tracked_run / "tracking.json").read_text())["mlflow"]
    listed = {Path(a.path).name for a in client.list_artifacts(run_id, "export")}
    assert expected | {"plots", "heldout_table.json"} <= listed
    plots = {Path(a.path).name for a in client.list_artifacts(run_id, "export/plots")}
    assert plots and plots == {n.split("/", 1)[1] for n in result.files if n.startswith("plots/")}
    local = Path(client.download_artifacts(run_id, "export/heldout_table.json", str(tmp_path)))
    table = json.loads(local.read_text())
    assert [row[0] for row in table["data"]] == [r.name for r in report.heldout]
    assert [row[-1] for row in table["data"]] == pytest.approx([r.mean for r in report.heldout])
    evolved = next(r for r in report.heldout if r.kind == "evolved")
    key = metric_key(f"heldout/{evolved.name}")  # MLflow refuses "(": "evolved _trial 4_"
    assert client.get_run(run_id).data.metrics[key] == pytest.approx(evolved.mean)
    # W&B: the same run id again (resume="allow"): an artifact with the files, and the table
    wb_id = json.loads((tracked_run / "tracking.json").read_text())["wandb"]
    files = wandb_files(root, wb_id)
    assert len(files) == 2
    records = wandb_records(files[-1])
    arts = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]
    names = {c.path for a in arts for c in a.manifest.contents}
    assert expected <= names and any(n.startswith("plots/") for n in names)
    (row,) = [r for r in wandb_history(files[-1]) if "heldout_table/path" in r]
    table_file = files[-1].parent / "files" / row["heldout_table/path"]
    wb_table = json.loads(table_file.read_text())
    assert [d[0] for d in wb_table["data"]] == [r.name for r in report.heldout]


def test_failing_tracker_warns_once_and_changes_nothing(root, plain_run, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="evomerge.tracking")
    code = main(["run", str(root / "failing.yaml"), "--runs-dir", str(tmp_path), "--quiet"])
    assert code == 0
    warned = [r.getMessage() for r in caplog.records if r.name == "evomerge.tracking"]
    assert len(warned) == 1 and "MLflow failed" in warned[0] and "reachable" in warned[0]
    assert trial_sequence(tmp_path / "tiny") == trial_sequence(plain_run[0])
    assert len(RunStore(tmp_path / "tiny").read_trials()) == 5


def test_missing_tracker_package_is_a_user_error(root, tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    code = main(["run", str(root / "tracked.yaml"), "--runs-dir", str(tmp_path), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "tracking: wandb needs the wandb package" in err
    assert "pip install 'evomerge[wandb]'" in err
    assert not (tmp_path / "tiny").exists()
