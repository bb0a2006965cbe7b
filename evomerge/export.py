"""Export a run's winner: the checkpoint, its recipes, a model card, the report and plots.

Everything lands in one folder, written atomically by `merge_to_disk` (temp folder, then
rename): the sharded safetensors with config and tokenizer, `recipe.yaml` (ours: `evomerge merge
recipe.yaml` rebuilds the weights), `mergekit.yaml` (when mergekit can express the recipe),
`README.md` (model card), `report.json` and `plots/*.png`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from evomerge import __version__
from evomerge.errors import ConfigError
from evomerge.recipe import Recipe
from evomerge.report import RunView, build_report, open_run, report_plots
from evomerge.report_model import Report

__all__ = ["ExportResult", "export_run", "mergekit_config"]


@dataclass(frozen=True)
class ExportResult:
    out_dir: Path
    trial: int
    fitness: list[float]
    recipe: Recipe
    mergekit_reason: str | None  # None: mergekit.yaml was written
    report: Report
    files: list[str]
    tensors: int
    bytes_written: int
    seconds: float

    @property
    def mergekit_written(self) -> bool:
        return self.mergekit_reason is None


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise ConfigError(
            f"--out {out} exists and is not empty; choose another folder or pass --force"
        )


def _check_not_inside(out: Path, view: RunView) -> None:
    """--force replaces --out wholesale: it must not hold the run or a source model."""
    precious = {"the run directory": view.store.dir}
    precious.update({f"model {n!r}": Path(p).resolve() for n, p in view.recipe.models.items()})
    for what, path in precious.items():
        if path == out or out in path.parents:
            raise ConfigError(f"--out {out} contains {what} ({path}); export somewhere else")


def mergekit_config(recipe: Recipe) -> tuple[str | None, str | None]:
    """(mergekit.yaml text, None) or (None, why mergekit cannot reproduce this recipe)."""
    from evomerge.mergekit_yaml import to_mergekit
    from evomerge.plan import build_layout, open_readers, resolve_task
    from evomerge.vocab import output_remap

    readers = open_readers(recipe)
    layout = build_layout(recipe, readers)
    try:
        data = to_mergekit(
            recipe,
            [resolve_task(recipe, out) for out in layout],
            vocab_differs=output_remap(readers) is not None,
        )
    except ConfigError as exc:
        return None, str(exc)
    header = (
        f"# mergekit config written by evomerge {__version__}: `mergekit-yaml mergekit.yaml OUT`\n"
        "# gives the same tensors as this checkpoint (per-layer values as gradient lists).\n"
    )
    return header + yaml.safe_dump(data, sort_keys=False, width=120), None


def export_run(
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    trial: int | None = None,
    force: bool = False,
    report: bool = True,
    progress: bool = True,
) -> ExportResult:
    """Write the best (or `trial`'s) merge of a run into `out_dir`, with recipes, card, report.

    `report=False` skips scoring the baselines (a cached table from `evomerge report` is still
    used). Raises ConfigError for a non-empty `out_dir` without `force`, before any work.
    """
    from evomerge.merge import MergeSettings, merge_to_disk
    from evomerge.model_card import model_card
    from evomerge.report_cache import write_report_dir
    from evomerge.worker import resolve_device

    out = Path(out_dir).expanduser().resolve()
    _check_out(out, force)
    view = open_run(run_dir, trial)
    _check_not_inside(out, view)
    mk_text, mk_reason = mergekit_config(view.recipe)
    rep = build_report(view, heldout=report, progress=progress)
    if rep.scored and not rep.cached:
        write_report_dir(view.store.dir, rep, {})  # cache the table for `report` and later exports
    plots = report_plots(view)
    files: dict[str, str | bytes] = {
        "recipe.yaml": f"# evomerge recipe: `evomerge merge recipe.yaml --out DIR` rebuilds these weights\n{view.recipe.to_yaml()}",
        "report.json": rep.to_json(),
        **{f"plots/{name}": data for name, data in plots.items()},
    }
    if mk_text is not None:
        files["mergekit.yaml"] = mk_text
    files["README.md"] = model_card(rep, view.recipe, mk_reason, sorted(files), mk_text)
    stats = merge_to_disk(
        view.recipe,
        MergeSettings(
            out_dir=out,
            device=resolve_device(view.config.device),
            overwrite=force,
            progress=progress,
        ),
        extra_files=files,
    )
    if view.config.tracking.trackers:  # W&B, MLflow: the artifacts and the held-out table
        from evomerge.tracking import log_export

        log_export(view.config, view.store.dir, out, rep)
    return ExportResult(
        out_dir=out,
        trial=view.record.trial,
        fitness=list(view.record.fitness or []),
        recipe=view.recipe,
        mergekit_reason=mk_reason,
        report=rep,
        files=sorted(files),
        tensors=stats.tensors,
        bytes_written=stats.bytes_written,
        seconds=stats.seconds,
    )
