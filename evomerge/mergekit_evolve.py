"""mergekit-evolve configs (`genome:` + `tasks:`) as evomerge studies.

mergekit 0.1.5's `mergekit-evolve` runs CMA-ES (`cma.fmin2`) over a genotype of shape (layer
groups, models, filters + 1, parameters) and decodes it into a mergekit config
(mergekit/evo/genome.py): weights `abs()` unless negative weights are allowed, densities
`abs().clamp(0, 1)`, one slice per layer group (or, with `smooth`, one gradient per parameter),
normalize by method, `int8_mask: true`, bfloat16; the fitness is `sum_i weight_i * metric_i`
over the tasks (mergekit/evo/helpers.py). The study built here has the same genes (one per
layer group, model, filter and parameter; none of their own for the tensors outside the blocks),
the same start point (weights 1/N, densities 1) and step (sigma0 1/6 in mergekit's units), the
same decoding (`search_space.outside_blocks: first_last`, `smooth`) and the same fitness.
What has no equivalent is said in one warning line; what cannot run is refused in one line.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import BaseModel, ConfigDict

from evomerge.errors import ConfigError
from evomerge.mergekit_params import LOG, model_ref, warn
from evomerge.registry import did_you_mean
from evomerge.yaml_io import read_yaml, validate_model

if TYPE_CHECKING:
    from evomerge.config import StudyConfig

# mergekit/evo/genome.py METHOD_PARAM_MAPS: the searched parameters of each method.
METHOD_PARAMS: dict[str, tuple[str, ...]] = {
    "linear": ("weight",),
    "task_arithmetic": ("weight",),
    "ties": ("weight", "density"),
    "dare_ties": ("weight", "density"),
    "slerp": ("t",),
}
NEEDS_BASE = ("ties", "dare_ties", "task_arithmetic")
NORMALIZED = ("ties", "dare_ties", "linear")  # genome.normalize's default (None) per method
SIGMA0 = 1 / 6  # mergekit-evolve's --sigma0 default, in its genotype's units
MAX_FEVALS = 100  # mergekit-evolve's --max-fevals default
DENSITY_LOW = 0.01  # evomerge's density must be > 0; mergekit clamps |x| to [0, 1]


class _Lenient(BaseModel):
    """mergekit's models ignore unknown keys; ours keep them to warn about each."""

    model_config = ConfigDict(frozen=True, extra="allow")


class EvolveTask(_Lenient):
    name: str
    weight: float = 1.0
    metric: str = "acc,none"


class EvolveGenome(_Lenient):
    models: list[Any]
    merge_method: str
    base_model: Any = None
    tokenizer_source: str | None = None
    layer_granularity: int = 0
    normalize: bool | None = None
    allow_negative_weights: bool = False
    filters: list[str] | None = None
    smooth: bool = False


class EvolveConfig(_Lenient):
    genome: EvolveGenome
    tasks: list[EvolveTask]
    limit: int | None = None
    num_fewshot: int | None = None
    shuffle: bool = False
    random_init: bool = False
    apply_chat_template: bool = True
    fewshot_as_multiturn: bool = True


def is_evolve_config(data: Any) -> bool:
    """A mergekit-evolve config has `genome:` and `tasks:`; a study has `models:`."""
    return isinstance(data, Mapping) and "genome" in data and "models" not in data


def parse_evolve(data: Mapping[str, Any], where: str) -> EvolveConfig:
    """Validated as mergekit-evolve validates it, with a warning per key it would drop."""
    tasks = data.get("tasks")
    if isinstance(tasks, list):  # a task may be written as its name
        data = {**data, "tasks": [{"name": t} if isinstance(t, str) else t for t in tasks]}
    cfg = validate_model(EvolveConfig, data, where)
    _warn_extra(cfg, where, "")
    _warn_extra(cfg.genome, where, "genome")
    for i, t in enumerate(cfg.tasks):
        _warn_extra(t, where, f"tasks[{i}]")
    return cfg


def _warn_extra(model: BaseModel, where: str, at: str) -> None:
    known = tuple(type(model).model_fields)
    for key in model.model_extra or {}:
        place = f"{at}: " if at else ""
        warn(
            f"{where}: {place}{key!r} is not a mergekit-evolve key; mergekit-evolve ignores it"
            f"{did_you_mean(key, known)}"
        )


def _ref_path(ref: str, base_dir: Path) -> str:
    """A local path as mergekit-evolve opens it (from the working directory; else next to the
    config), absolute; anything else (a hub id) as written."""
    for cand in (Path(ref).expanduser(), base_dir / ref):
        if cand.exists():
            return str(cand.resolve())
    return ref


def _source_names(paths: Sequence[str], reserved: set[str]) -> list[str]:
    """Gene-name-safe unique names from paths ('/m/Mistral-7B.v2' -> 'Mistral-7B_v2')."""
    out: list[str] = []
    for p in paths:
        stem = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(p.rstrip("/")).name).strip("_") or "model"
        name, k = stem, 2
        while name in out or name in reserved:
            name, k = f"{stem}_{k}", k + 1
        out.append(name)
    return out


def _num_layers(path: str, where: str) -> int:
    """mergekit-evolve reads the layer count of genome.models[0]."""
    from evomerge.checkpoint import CheckpointReader

    return CheckpointReader(path, where=f"{where}: genome.models[0]").num_layers


def evolve_to_study(
    cfg: EvolveConfig,
    *,
    name: str,
    where: str,
    base_dir: Path,
    task_search_path: Sequence[str] = (),
) -> tuple[dict[str, Any], list[str]]:
    """The study dict equivalent to `cfg`, and notes (one per line) on how it maps."""
    g = cfg.genome
    method = g.merge_method
    if method not in METHOD_PARAMS:
        raise ConfigError(
            f"{where}: genome.merge_method {method!r} is not one of mergekit-evolve's methods "
            f"({', '.join(METHOD_PARAMS)}){did_you_mean(method, METHOD_PARAMS)}"
        )
    if method == "slerp":
        raise ConfigError(
            f"{where}: genome.merge_method slerp is not supported: mergekit-evolve picks the two "
            "highest-weight models per layer group and t from a softmax of their genes, which no "
            "evomerge search space expresses; use search_space: {preset: slerp} in a study"
        )
    if method in NEEDS_BASE and not g.base_model:
        raise ConfigError(
            f"{where}: genome.base_model is required for {method} (mergekit-evolve's rule)"
        )
    if len(g.models) < 2:
        raise ConfigError(f"{where}: genome.models needs at least two models to merge")
    refs = [model_ref(m, f"{where}: genome.models[{i}]") for i, m in enumerate(g.models)]
    base_ref = model_ref(g.base_model, f"{where}: genome.base_model") if g.base_model else None
    notes: list[str] = []
    paths = [_ref_path(r, base_dir) for r in refs]
    base_path = _ref_path(base_ref, base_dir) if base_ref else None
    if base_ref is not None and base_path not in paths and method == "linear":
        raise ConfigError(
            f"{where}: genome.base_model with linear: mergekit-evolve adds it as one more input "
            "without a weight, which mergekit refuses; list it under genome.models or drop it"
        )
    if method == "linear":
        base_path = None  # linear merges what genome.models lists; the base is one of them
    elif base_path in paths:
        warn(
            f"{where}: genome.models lists the base_model; {method} uses none of its parameters "
            "(in mergekit-evolve its genes have no effect), so the study has no genes for it"
        )
        paths = [p for p in paths if p != base_path]
        if len(paths) < 2:
            raise ConfigError(f"{where}: genome.models needs two models besides the base_model")
    names = _source_names(paths, {"base"} if base_path else set())
    n_layers = _num_layers(paths[0], where)
    granularity = g.layer_granularity if g.layer_granularity > 0 else n_layers
    if n_layers % granularity:
        raise ConfigError(
            f"{where}: genome.layer_granularity {g.layer_granularity} does not divide the "
            f"{n_layers} layers of the models (mergekit-evolve's rule)"
        )
    tokenizer_source = None
    if g.tokenizer_source is not None:
        tokenizer_source = _check_tokenizer(
            g.tokenizer_source, paths, names, base_path, where, base_dir
        )
    if cfg.apply_chat_template:
        _check_chat_template(base_path or paths[0], where)
    space = _space(cfg, len(g.models), granularity, n_layers)
    notes += _warn_unsupported(cfg, where)
    metrics = [
        {"task": t.name, "metric": t.metric, "weight": t.weight, "direction": "maximize"}
        for t in cfg.tasks
    ]
    search = list(dict.fromkeys(t.name for t in cfg.tasks))
    if not search:
        raise ConfigError(f"{where}: tasks is empty")
    width = 2.0 if g.allow_negative_weights else 1.0
    study: dict[str, Any] = {
        "name": name,
        "models": {
            "base": base_path,
            "sources": [{"name": n, "path": p} for n, p in zip(names, paths, strict=True)],
            **({"tokenizer_source": tokenizer_source} if tokenizer_source else {}),
        },
        "search_space": space,
        "tasks": {
            "include_path": list(task_search_path),
            "search": search,
            "heldout": [],
            "limit": cfg.limit,
            "num_fewshot": cfg.num_fewshot,
            "apply_chat_template": cfg.apply_chat_template,
        },
        "objective": {"metrics": metrics},
        "optimizer": {"name": "cma", "sigma0": round(SIGMA0 / width, 6)},
        "budget": {"max_trials": MAX_FEVALS},
        "executor": {"kind": "local", "workers": 1},
        "device": "auto",
        "dtype": "bfloat16",
        "seed": 0,
    }
    return study, notes


def _space(cfg: EvolveConfig, n_models: int, granularity: int, n_layers: int) -> dict[str, Any]:
    g = cfg.genome
    low = -1.0 if g.allow_negative_weights else 0.0
    per_model: dict[str, Any] = {
        "weight": {"low": low, "high": 1.0, "init": round(1 / n_models, 6)}
    }
    if "density" in METHOD_PARAMS[g.merge_method]:
        per_model["density"] = {"low": DENSITY_LOW, "high": 1.0, "init": 1.0}
    normalize = g.normalize if g.normalize is not None else g.merge_method in NORMALIZED
    parameters: dict[str, Any] = {"normalize": normalize}
    if g.merge_method != "linear":
        parameters["int8_mask"] = True  # as mergekit-evolve writes it (no effect on the values)
    groups: list[dict[str, Any]] = []
    for f in g.filters or []:
        gname = re.sub(r"[^A-Za-z0-9_]+", "_", f).strip("_") or "filter"
        while gname in [x["name"] for x in groups] or gname == "rest":
            gname += "_"
        groups.append({"name": gname, "filter": f})
    groups.append({"name": "rest"})
    return {
        "description": (
            f"mergekit-evolve genome: {g.merge_method}, {n_layers // granularity} layer groups of "
            f"{granularity}, {len(groups)} tensor group(s), a gene per model and parameter"
        ),
        "granularity": granularity,
        "tensor_groups": groups,
        "global_group": False,
        "outside_blocks": "first_last",
        "smooth": g.smooth,
        "methods": {g.merge_method: {"per_model": per_model, "parameters": parameters}},
    }


def _check_tokenizer(
    source: str,
    paths: Sequence[str],
    names: Sequence[str],
    base: str | None,
    where: str,
    base_dir: Path,
) -> str:
    """The study's models.tokenizer_source (base, union or a source's name): mergekit reworks
    the embeddings for it, and so does the study (`evomerge.vocab`)."""
    from evomerge.mergekit_files import check_tokenizer
    from evomerge.mergekit_read import TokenizerSpec

    models = dict(zip(names, paths, strict=True))
    if base is not None:
        models = {"base": base, **models}
    written = f"genome.tokenizer_source: {source}"
    if source not in ("union", "base"):
        src_path = _ref_path(source, base_dir)
        match = [n for n, p in models.items() if p == src_path]
        if not match:
            raise ConfigError(
                f"{where}: genome.tokenizer_source {source!r} is not one of the genome's models"
            )
        source = match[0]
    spec = TokenizerSpec(source, written, {}, None)
    check_tokenizer(spec, models, "base" if base is not None else None, where)
    return source


def _check_chat_template(path: str, where: str) -> None:
    """apply_chat_template defaults to true in mergekit-evolve; lm-eval then fails on every
    candidate of a model whose tokenizer has no template. Say so before anything runs."""
    import transformers

    try:
        tok = transformers.AutoTokenizer.from_pretrained(path)
    except Exception:  # no loadable tokenizer: scoring will say so
        return
    if not getattr(tok, "chat_template", None):
        raise ConfigError(
            f"{where}: apply_chat_template is true (mergekit-evolve's default) but the tokenizer "
            f"of {path} has no chat template; set apply_chat_template: false"
        )


def _warn_unsupported(cfg: EvolveConfig, where: str) -> list[str]:
    """One warning per mergekit-evolve setting without an equivalent; returned as notes too."""
    notes = []
    if cfg.random_init:
        notes.append(
            "random_init: true is not supported: the search starts from mergekit-evolve's "
            "default point (weights 1/N, densities 1)"
        )
    if cfg.shuffle and cfg.limit is not None:
        notes.append(
            "shuffle: true is not supported: every candidate is scored on the first `limit` "
            "documents of each task (mergekit-evolve shuffles each worker's copy, unseeded)"
        )
    if cfg.apply_chat_template and not cfg.fewshot_as_multiturn and cfg.num_fewshot:
        notes.append(
            "fewshot_as_multiturn: false is not supported: with apply_chat_template the "
            "few-shot examples become a multi-turn chat"
        )
    for n in notes:
        warn(f"{where}: {n}")
    return notes


def study_yaml(study: Mapping[str, Any], notes: Sequence[str], source: str) -> str:
    """The study as YAML, with comments on how it maps the mergekit-evolve config."""
    g = study["search_space"]
    lines = [
        f"# evomerge study converted from the mergekit-evolve config {source} (evomerge convert).",
        "# Genes: one per model and searched parameter for each layer group of "
        f"{g['granularity']} layer(s) and each",
        "# tensor group (genome.filters, then the rest), as mergekit-evolve's genotype; none of "
        "their own for the",
        "# embeddings, final norm and lm_head, which follow the first and the last layer group "
        "(outside_blocks).",
        "# Fitness: the weighted sum of the named metrics as mergekit-evolve computes it "
        "(direction maximize;",
        "# a negative weight minimizes). budget.max_trials is --max-fevals, seed is "
        "--random-seed, optimizer.sigma0",
        "# is --sigma0 in evomerge's units (each gene's range scaled to [0, 1]); "
        "optimizer.popsize is --force-population-size.",
        "# tasks.heldout is empty: mergekit-evolve has no held-out tasks. Add some to have the "
        "winner judged on data",
        "# the search never saw (the export report then scores them next to the parents and "
        "standard merges).",
    ]
    lines += [f"# Not supported: {n}" for n in notes]
    body = yaml.safe_dump(dict(study), sort_keys=False, default_flow_style=None, width=100)
    return "\n".join(lines) + "\n" + body


def convert_file(
    path: str | Path,
    *,
    task_search_path: Sequence[str] = (),
    overrides: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], str]:
    """A mergekit-evolve YAML file -> (study dict, commented study YAML); `overrides` are the
    CLI's dotted keys (budget.max_trials, seed, ...), applied before the YAML is written."""
    from evomerge.config import apply_overrides

    data = read_yaml(path)
    if not is_evolve_config(data):
        raise ConfigError(f"{path}: not a mergekit-evolve config (it needs genome: and tasks:)")
    where = str(path)
    cfg = parse_evolve(data, where)
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(path).stem).lstrip(".") or "evolve"
    study, notes = evolve_to_study(
        cfg,
        name=stem,
        where=where,
        base_dir=Path(path).resolve().parent,
        task_search_path=[str(Path(p).resolve()) for p in task_search_path],
    )
    apply_overrides(study, dict(overrides or {}), where)
    return study, study_yaml(study, notes, where)


def load_study(
    path: str | Path,
    overrides: Mapping[str, Any] | None = None,
    task_search_path: Sequence[str] | None = None,
) -> StudyConfig:
    """A StudyConfig from a study YAML or a mergekit-evolve config (converted on the fly);
    `task_search_path` (mergekit-evolve's flag) sets tasks.include_path."""
    from evomerge.config import load_study_config, parse_study

    overrides = dict(overrides or {})
    if not is_evolve_config(read_yaml(path)):
        if task_search_path:
            overrides["tasks.include_path"] = [str(Path(p).resolve()) for p in task_search_path]
        return load_study_config(path, overrides)
    LOG.warning(
        "evomerge: %s: read as a mergekit-evolve config (evomerge convert %s prints the study "
        "it becomes)",
        path,
        path,
    )
    study, _ = convert_file(path, task_search_path=task_search_path or (), overrides=overrides)
    return parse_study(study, str(path))
