"""Item-level results: which documents of each task a candidate was scored on, and each one's
own value per metric (lm-eval's per-sample metric: 1/0 for acc and exact_match).

Racing scores a candidate on growing subsets of the fitness items, estimators fit item response
models on them, and reports bootstrap paired differences from them, so they are kept per trial,
compactly: one `.npz` per evaluation (a few KB), not JSON. Pure data and numpy; no torch.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evomerge.atomic import atomic_write


@dataclass(frozen=True)
class ItemScores:
    """Per task: the document indices scored (`ids`) and, per metric, the values in that order."""

    ids: Mapping[str, np.ndarray]  # task -> int64 document indices
    values: Mapping[str, Mapping[str, np.ndarray]]  # task -> metric key -> float64 per document

    @classmethod
    def from_lists(
        cls, ids: Mapping[str, Sequence[int]], values: Mapping[str, Mapping[str, Sequence[float]]]
    ) -> ItemScores:
        out_ids = {t: np.asarray(list(i), dtype=np.int64) for t, i in ids.items()}
        out_values: dict[str, dict[str, np.ndarray]] = {}
        for task, per in values.items():
            out_values[task] = {}
            for metric, vals in per.items():
                arr = np.asarray([float(v) for v in vals], dtype=np.float64)
                if arr.shape != out_ids[task].shape:
                    raise ValueError(
                        f"{task}/{metric}: {arr.size} values for {out_ids[task].size} items"
                    )
                out_values[task][metric] = arr
        return cls(out_ids, out_values)

    @property
    def count(self) -> int:
        """Items scored, over all tasks."""
        return int(sum(len(i) for i in self.ids.values()))

    def metrics(self) -> dict[str, dict[str, float]]:
        """The mean of each metric over the items scored (lm-eval's `mean` aggregation)."""
        return {
            task: {m: float(v.sum() / v.size) for m, v in per.items() if v.size}
            for task, per in self.values.items()
        }

    def union(self, other: ItemScores) -> ItemScores:
        """Both sets of items (a racing candidate's rungs), ordered by document index; an item
        scored in both keeps this one's value (the same recipe scores an item the same)."""
        ids: dict[str, np.ndarray] = {}
        values: dict[str, dict[str, np.ndarray]] = {}
        for task in dict.fromkeys([*self.ids, *other.ids]):
            mine = self.ids.get(task, np.zeros(0, np.int64))
            theirs = other.ids.get(task, np.zeros(0, np.int64))
            new = ~np.isin(theirs, mine)
            all_ids = np.concatenate([mine, theirs[new]])
            order = np.argsort(all_ids, kind="stable")
            ids[task] = all_ids[order]
            metrics = set(self.values.get(task, {})) | set(other.values.get(task, {}))
            values[task] = {}
            for m in sorted(metrics):
                a = self.values.get(task, {}).get(m, np.full(mine.size, np.nan))
                b = other.values.get(task, {}).get(m, np.full(theirs.size, np.nan))
                values[task][m] = np.concatenate([a, b[new]])[order]
        return ItemScores(ids, values)

    def select(self, task: str, metric: str, ids: np.ndarray) -> np.ndarray:
        """This metric's values on `ids` (all of which must have been scored)."""
        pos = np.searchsorted(self.ids[task], ids)
        if np.any(pos >= self.ids[task].size) or np.any(self.ids[task][pos] != ids):
            raise KeyError(f"{task}: items {ids.tolist()} were not all scored")
        return self.values[task][metric][pos]

    # ------------------------------------------------------------------ storage
    def to_bytes(self) -> bytes:
        arrays: dict[str, np.ndarray] = {}
        for task, ids in self.ids.items():
            arrays[f"ids/{task}"] = ids
            for metric, vals in self.values.get(task, {}).items():
                arrays[f"val/{task}/{metric}"] = vals
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> ItemScores:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            ids = {k[4:]: z[k] for k in z.files if k.startswith("ids/")}
            values: dict[str, dict[str, np.ndarray]] = {t: {} for t in ids}
            for k in z.files:
                if k.startswith("val/"):
                    task, _, metric = k[4:].rpartition("/")
                    values[task][metric] = z[k]
        return cls(ids, values)

    def save(self, path: Path) -> None:
        atomic_write(path, self.to_bytes())

    @classmethod
    def load(cls, path: Path) -> ItemScores:
        return cls.from_bytes(Path(path).read_bytes())


def mean_and_variance(
    values: np.ndarray, population: int, bounds: tuple[float, float] = (0.0, 1.0)
) -> tuple[float, float]:
    """Mean of a simple random sample of `values.size` items out of `population`, and the
    variance of that mean with the finite-population correction: 0 when every item was scored,
    so a full-fidelity score has no sampling uncertainty about the fitness it defines.

    The sample variance is taken with two pseudo-items at `bounds` (the values' range: (0, 1)
    for per-item metrics, (-1, 1) for paired differences), as Agresti-Caffo do for proportions:
    ten correct answers out of ten are not a certainty, and a zero variance would let racing
    stop a candidate on a handful of items."""
    n = values.size
    if n == 0:
        return math.nan, math.inf
    mean = float(values.sum() / n)
    if n >= population:
        return mean, 0.0
    padded = np.concatenate([values, np.asarray(bounds, dtype=np.float64)])
    var = float(padded.var(ddof=1))
    return mean, var / n * (1.0 - n / population)
