"""A worker: one live model with resident sources and built-once scorers.

Each candidate is materialized in place into the live model and scored; nothing touches disk.
The same class runs in process (local executor) and inside Ray actors.
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict

from evomerge.errors import CandidateError, ResourceError, UserError
from evomerge.fidelity import FitnessConfig, Rungs
from evomerge.items import ItemScores
from evomerge.model_set import ModelSet
from evomerge.recipe import Recipe
from evomerge.residency import Tier
from evomerge.scoring.config import ScoringSettings


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class WorkerSpec(BaseModel):
    """Everything a worker needs to build itself; frozen pydantic, so it ships to Ray actors."""

    model_config = ConfigDict(frozen=True)
    models: ModelSet  # the live model has the reference model's architecture and tokenizer
    device: str
    dtype: str
    scoring: ScoringSettings  # the search split: the fitness
    heldout: ScoringSettings | None = None  # held-out tasks, for reports only
    fitness: FitnessConfig = FitnessConfig()  # racing rungs (which items each rung scores)
    seed: int = 0  # the study seed: orders the items of the rungs
    allow_pickle: bool = False
    trust_remote_code: bool = False
    residency: Tier = "device"  # where the sources live (evomerge.residency), auto resolved
    # the devices of a worker over several GPUs (executor.gpus_per_worker), the live model split
    # by layer over them (evomerge.device_map); empty: everything on `device`
    devices: tuple[str, ...] = ()


@dataclass
class Outcome:
    scores: dict[str, dict[str, float]] | None
    error: str | None
    seconds: dict[str, float] = field(default_factory=dict)
    worker: str = ""
    items: ItemScores | None = None  # the items scored and each one's values
    item_counts: dict[str, int] = field(default_factory=dict)  # items per task in the full set
    started_at: float = 0.0  # wall clock when the evaluation began (worker utilization plots)
    memory: dict[str, int] | None = None  # peak bytes per device, on a worker's first candidate


class Worker:
    def __init__(self, spec: WorkerSpec) -> None:
        from evomerge.memory import keep_freed_memory

        keep_freed_memory()  # Ray actors are fresh processes
        from evomerge.memory_measure import reset_peak

        self._host_base: int | None = reset_peak()  # None once reported (memory_plan)
        t0 = time.perf_counter()
        self.spec = spec
        self.device = resolve_device(spec.device)
        self.name = f"{socket.gethostname()}:{os.getpid()}:{self.device}"
        try:
            self._load(spec)
        except Exception as exc:
            if _is_oom(exc):
                raise oom_error(spec, self.device, "loading the models", exc) from exc
            raise
        self._scorers: dict[str, Any] = {}
        self._rungs: Rungs | None = None
        self._merged: str | None = None  # content hash of the recipe in the live model
        self.load_seconds = time.perf_counter() - t0

    def _load(self, spec: WorkerSpec) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from evomerge.architectures import checkpoint_views, live_targets
        from evomerge.checkpoint import CheckpointReader, parse_dtype
        from evomerge.plan import model_layout
        from evomerge.residency.stores import make_sources
        from evomerge.resident import InPlaceMerger

        self.readers = {
            name: CheckpointReader(path, allow_pickle=spec.allow_pickle, where=f"model {name!r}")
            for name, path in spec.models.paths.items()
        }
        from evomerge.vocab import output_remap, remap_readers

        # vocabularies that differ: every model's token rows in the output tokenizer's, and the
        # live model's embeddings of that many rows (evomerge.vocab)
        self.readers = remap_readers(self.readers, spec.models.tokenizer_source, spec.models.base)
        remap = output_remap(self.readers)
        ref_path = self.readers[spec.models.reference].path
        dtype = parse_dtype(spec.dtype) or torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(
            ref_path, dtype=dtype, trust_remote_code=spec.trust_remote_code
        ).to("cpu" if spec.devices else self.device)
        if remap is not None:
            self.model.resize_token_embeddings(remap.rows, mean_resizing=False)
        if spec.devices:  # split by layer over the worker's devices (evomerge.device_map)
            from evomerge.device_map import dispatch, layer_device_map

            self.device_map = layer_device_map(self.model, spec.devices, dtype)
            self.model = dispatch(self.model, self.device_map)
        self.model.eval()
        self.tokenizer = (
            remap.tokenizer
            if remap is not None
            else AutoTokenizer.from_pretrained(ref_path, trust_remote_code=spec.trust_remote_code)
        )
        # sides: a search space's `outside` sections (outside_blocks: first_last) need them
        layout = model_layout(self.readers, spec.models.reference, sides=True)
        # checkpoint tensors -> the live memory transformers loaded them into (fused MoE
        # experts, renamed heads): evomerge.architectures
        shapes = {o.name: o.shape for o in layout}
        views = checkpoint_views(self.model, shapes)
        targets = live_targets(self.model, shapes, views)
        if spec.devices and spec.residency == "device":  # each source where its parameter is
            from evomerge.resident import ResidentSources

            where = {s: targets[o.name].device for o in layout for s in o.sources.values()}
            self.sources = ResidentSources(self.readers, device=self.device, placement=where)
        else:
            self.sources = make_sources(spec.residency, self.readers, device=self.device)
        from evomerge.fusion import fused_tensors  # a layer's experts merged as one tensor

        self.merger = InPlaceMerger(targets, self.sources, layout, fused_tensors(self.model, views))

    @staticmethod
    def uses_cpu(spec: WorkerSpec) -> bool:
        return resolve_device(spec.device) == "cpu"

    def scorer(self, split: str) -> Any:
        from evomerge.scoring import Scorer

        if split not in self._scorers:
            settings = self.spec.scoring if split == "search" else self.spec.heldout
            if settings is None:
                raise UserError("this study names no held-out tasks (tasks.heldout)")
            self._scorers[split] = Scorer(
                self.model, self.tokenizer, settings, fitness=(split == "search")
            )
        return self._scorers[split]

    def rungs(self) -> Rungs:
        """The racing rungs of the fitness items (built once, from the scorer's item counts)."""
        if self._rungs is None:
            counts = self.scorer("search").item_counts
            self._rungs = Rungs.build(counts, self.spec.fitness, self.spec.seed)
        return self._rungs

    def evaluate(
        self,
        recipe: Recipe,
        split: str = "search",
        rung: int | None = None,
        scored: int | None = None,
    ) -> Outcome:
        """Merge in place and score, on every item or (racing) on the items of `rung` that rung
        `scored` lacked. A failing candidate returns its error; it never raises."""
        seconds: dict[str, float] = {}
        scorer = self.scorer(split)  # a broken task setup is the user's error: it propagates
        subset = None if rung is None else self.rungs().delta(rung, scored)
        started_at = time.time()
        t0 = time.perf_counter()
        try:
            key = recipe.content_hash()
            if scored is not None and key == self._merged:  # a promotion of the model in place
                seconds["merge"] = 0.0
            else:
                self._merged = None
                seconds["merge"] = self.merger.apply(recipe)
                self._merged = key
            result = scorer.score(subset)
            seconds["score"] = result.seconds
            seconds["forward"] = result.forward_seconds
            seconds["harness"] = result.overhead_seconds
            seconds["total"] = time.perf_counter() - t0
            return Outcome(
                result.metrics,
                None,
                seconds,
                self.name,
                items=result.items,
                item_counts=scorer.item_counts,
                started_at=started_at,
                memory=self._peak_once(),
            )
        except Exception as exc:  # a candidate that breaks is data, not the end of the study
            if _is_oom(exc):
                raise oom_error(self.spec, self.device, "evaluating a candidate", exc) from exc
            seconds["total"] = time.perf_counter() - t0
            msg = (
                str(exc)
                if isinstance(exc, (CandidateError, UserError))
                else traceback.format_exception_only(type(exc), exc)[-1].strip()
            )
            return Outcome(None, msg, seconds, self.name, started_at=started_at)

    def _peak_once(self) -> dict[str, int] | None:
        """Peak bytes per device since the worker started, with its first candidate only."""
        if self._host_base is None:
            return None
        from evomerge.memory_measure import peak_memory

        devices = {t.device for t in self.merger.targets.values()} | {self.device}
        base, self._host_base = self._host_base, None
        return peak_memory(devices, base)


def _is_oom(exc: BaseException) -> bool:
    text = str(exc).lower()
    return (
        type(exc).__name__ == "OutOfMemoryError"
        or "out of memory" in text
        or "can't allocate memory" in text
    )


def oom_error(spec: WorkerSpec, device: str, stage: str, exc: BaseException) -> ResourceError:
    """Out of memory is the study's size, not the candidate's fault: say what to make smaller."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    batch = spec.scoring.batch_size
    return ResourceError(
        f"out of memory on {device} while {stage} ({len(spec.models.paths)} models resident in their "
        f"file dtype + the live model in {spec.dtype}, tasks.batch_size {batch}): keep fewer "
        "sources (models.sources), use dtype: bfloat16, lower tasks.batch_size, or run fewer "
        f"workers per device / use a device with more memory. ({first[:200]})"
    )
