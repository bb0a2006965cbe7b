"""Every row of a report table against the evolved row, on the same items: the difference of
their means and its paired bootstrap confidence interval (evomerge.bootstrap).

A row is compared only where the items tell its table values: every task of the split has
per-item values of its primary metric for both models, on the evolved model's items, and their
mean is the task's value (lm-eval's `mean` aggregation; a group, or a corpus-level metric such as
BLEU or F1, is no mean of its items and gets no interval). What cannot be compared gets a note,
never a made-up interval.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from evomerge.bootstrap import CONFIDENCE, RESAMPLES, SEED, paired_bootstrap
from evomerge.items import ItemScores
from evomerge.report_model import Comparison, ReportRow, Split, VsEvolved

_SAME = 1e-9  # how close an item mean must be to the table value (both are means of 0/1 values)


def settings() -> Comparison:
    """The comparison this version computes (a cached report with other settings is redone)."""
    return Comparison(confidence=CONFIDENCE, resamples=RESAMPLES, seed=SEED)


def primary_items(items: ItemScores | None, primary: Mapping[str, str]) -> ItemScores | None:
    """Only the primary metric of each table task: what the comparisons (and items.npz) use."""
    if items is None:
        return None
    ids = {t: items.ids[t] for t in primary if t in items.ids}
    values = {
        t: {m: items.values[t][m]} for t, m in primary.items() if m in items.values.get(t, {})
    }
    return ItemScores(ids, {t: values.get(t, {}) for t in ids})


def _values(items: ItemScores | None, task: str, metric: str, ids: np.ndarray) -> np.ndarray | None:
    """The metric's values on documents `ids` (in that order, whatever order they were scored
    in), or None when they were not all scored or are not finite."""
    if items is None or metric not in items.values.get(task, {}):
        return None
    have = items.ids[task]
    order = np.argsort(have, kind="stable")
    pos = np.searchsorted(have[order], ids)
    if np.any(pos >= have.size) or np.any(have[order][np.minimum(pos, have.size - 1)] != ids):
        return None
    vals = items.values[task][metric][order][pos]
    return vals if np.all(np.isfinite(vals)) else None


def _tells(values: np.ndarray | None, table_value: float | None) -> bool:
    """The items' mean is the table's value for the task (so the interval is about that)."""
    return (
        values is not None
        and table_value is not None
        and values.size > 0
        and (math.isclose(float(values.mean()), table_value, rel_tol=0.0, abs_tol=_SAME))
    )


def compare_split(
    split: Split,
    rows: Sequence[ReportRow],
    items: Sequence[ItemScores | None],
    primary: Mapping[str, str],
) -> tuple[tuple[ReportRow, ...], int, list[str]]:
    """(rows with `vs_evolved` set, items compared, notes) for one split's table."""
    label = "held-out" if split == "heldout" else "search"
    ref = next((i for i, r in enumerate(rows) if r.kind == "evolved"), None)
    if ref is None or rows[ref].error or items[ref] is None:
        return tuple(rows), 0, [f"no {label} confidence intervals: the evolved model has no scores"]
    evolved, ref_items = rows[ref], items[ref]
    ref_vals: dict[str, np.ndarray] = {}
    for task, metric in primary.items():
        ids = ref_items.ids.get(task)
        vals = None if ids is None else _values(ref_items, task, metric, ids)
        if not _tells(vals, evolved.tasks.get(task)):
            why = (
                f"no {label} confidence intervals: {task} has no per-item {metric} that averages "
                "to its score (a group, or a metric lm-eval does not aggregate as a mean of items)"
            )
            return tuple(rows), 0, [why]
        ref_vals[task] = vals
    compared: list[int] = []
    diffs: dict[str, list[np.ndarray]] = {t: [] for t in primary}
    notes: list[str] = []
    for i, (row, its) in enumerate(zip(rows, items, strict=True)):
        if i == ref or row.error:
            continue  # the reference itself; a failed row says so already
        per = {t: _values(its, t, m, ref_items.ids[t]) for t, m in primary.items()}
        if not all(_tells(v, row.tasks.get(t)) for t, v in per.items()):
            notes.append(f"{row.name}: no interval (its {label} items are not the evolved model's)")
            continue
        compared.append(i)
        for t, v in per.items():
            diffs[t].append(v - ref_vals[t])
    out = list(rows)
    if compared:
        stacked = {t: np.stack(d) for t, d in diffs.items()}  # task -> (rows, items)
        for i, iv in zip(compared, paired_bootstrap(stacked), strict=True):
            vs = VsEvolved(diff=iv.diff, ci=(iv.low, iv.high), significant=iv.significant)
            out[i] = rows[i].model_copy(update={"vs_evolved": vs})
    return tuple(out), sum(v.size for v in ref_vals.values()), notes


def compare_tables(
    tables: Mapping[Split, Sequence[ReportRow]],
    items: Mapping[Split, Sequence[ItemScores | None]],
    primary: Mapping[Split, Mapping[str, str]],
) -> tuple[dict[Split, tuple[ReportRow, ...]], Comparison]:
    """Both splits compared: (rows per split, the comparison with its sizes and notes). Any
    earlier `vs_evolved` of the rows is replaced."""
    out: dict[Split, tuple[ReportRow, ...]] = {}
    sizes: dict[Split, int] = {}
    notes: list[str] = []
    for split, given in tables.items():
        rows = [r.model_copy(update={"vs_evolved": None}) for r in given]
        its = items.get(split)
        if not rows or its is None or len(its) != len(rows):
            out[split] = tuple(rows)
            continue
        out[split], n, why = compare_split(split, rows, its, primary[split])
        notes += why
        if n:
            sizes[split] = n
    return out, settings().model_copy(update={"items": sizes, "notes": tuple(notes)})
