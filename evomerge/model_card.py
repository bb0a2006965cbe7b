"""The model card (README.md) of an exported merge, written from its `Report` and recipe alone:
provenance (sources, search space, optimizer, trials), scores, how to rebuild and load it.

The YAML front matter is the metadata the Hugging Face Hub reads for merges, written by
huggingface_hub's `ModelCardData` (so `ModelCard.load` reads it back) with what mergekit's card
has: `base_model` (the hub ids among the models, base first: the Hub refuses a card whose
base_model is no model id, so local folders are named only in the body and under `evomerge`),
`tags` [merge, mergekit, evomerge], `library_name: transformers`, and the mergekit config in
the body as a yaml block; plus `evomerge`: version, run, trial, fitness, held-out means, models
(as the study named them, `org/name@revision` included) and `revisions`, the hub revision each
pinned model was read at (base_model stays the bare id, which is what the Hub links).
"""

from __future__ import annotations

import json
import re
from typing import Any

from evomerge import __version__
from evomerge.checkpoint import is_hub_id
from evomerge.hub_ref import split_revision
from evomerge.recipe import Recipe
from evomerge.report_model import Report
from evomerge.report_table import markdown_heldout_table

LOAD = """```python
from transformers import AutoModelForCausalLM, AutoTokenizer

path = "path/to/this/folder"
model = AutoModelForCausalLM.from_pretrained(path)
tokenizer = AutoTokenizer.from_pretrained(path)
```"""


def _mergekit_line(mk_reason: str | None) -> str:
    if mk_reason is None:
        return "`mergekit.yaml` reproduces these weights with `mergekit-yaml mergekit.yaml OUT`."
    return f"No `mergekit.yaml`: mergekit cannot reproduce this recipe ({mk_reason})."


def _method_line(report: Report, recipe: Recipe) -> str:
    """The winning recipe's methods, and the space and optimizer that found it."""
    run = report.run
    sp = run.search_space
    methods: dict[str, int] = {}
    for s in recipe.sections:
        methods[s.method] = methods.get(s.method, 0) + 1
    opts = run.optimizer.options
    return f"""- winning recipe: {", ".join(f"{m} ({n} sections)" for m, n in methods.items())}, dtype {recipe.dtype or "as sources"}
- search space: {sp.preset or "inline"} ({sp.genes} genes, methods {", ".join(sp.methods)}, {sp.granularity} layer(s) per group)
  {sp.description}
- optimizer: {run.optimizer.name} {json.dumps(opts, sort_keys=True) if opts else ""}, seed {run.seed}
- trials: {run.trials} of a budget of {run.budget} ({run.failed} failed, {run.duplicates} duplicates)
- fitness tasks: {", ".join(run.search_tasks)}; held-out tasks: {", ".join(run.heldout_tasks) or "none"}
"""


# a hub id's folder in the HF hub cache: <cache>/models--<org>--<name>/snapshots/<commit>
_SNAPSHOT = re.compile(r"(?:^|/)models--([^/]+?)--([^/]+)/snapshots/([0-9a-f]{40})/?$")


def hub_id(ref: str) -> str | None:
    """'org/name' for a hub id (a pinned 'org/name@revision' too), or for the cached snapshot
    folder a hub id resolved to (what a recipe holds); None for any other folder."""
    if is_hub_id(ref):
        return split_revision(ref)[0]
    m = _SNAPSHOT.search(ref.strip())
    return f"{m[1]}/{m[2]}" if m else None


def hub_base_models(report: Report, recipe: Recipe) -> list[str]:
    """The hub ids among the merged models, base first: as the study named them, then as the
    recipe resolved them (a LoRA source's base, `base+adapter`); each part of a mergekit
    `model+adapter` reference counts, as mergekit's card lists them."""
    models = report.run.models
    refs = ([models.base] if models.base else []) + list(models.sources.values())
    refs += list(recipe.models.values())
    ids = [hub_id(part) for ref in refs for part in ref.split("+")]
    return list(dict.fromkeys(i for i in ids if i))


def pinned_revisions(report: Report, recipe: Recipe) -> list[dict[str, str]]:
    """{model, revision, commit} for each hub id the study or the recipe pinned to a revision
    ('org/name@v2'; each part of a `base+adapter`), `commit` the snapshot the recipe read it
    from when the recipe holds that folder: a branch moves, the commit does not."""
    models = report.run.models
    named = [("base", models.base)] if models.base else []
    named += list(models.sources.items()) + list(recipe.models.items())
    out: list[dict[str, str]] = []
    for name, ref in named:
        for part in ref.split("+"):
            if not is_hub_id(part):
                continue
            repo, revision = split_revision(part)
            if revision is None:
                continue
            entry = {"model": repo, "revision": revision}
            resolved = recipe.models.get(name, "").split("+")
            snap = next((m for m in map(_SNAPSHOT.search, resolved) if m), None)
            if snap is not None and f"{snap[1]}/{snap[2]}" == repo:
                entry["commit"] = snap[3]
            if not any(e["model"] == repo and e["revision"] == revision for e in out):
                out.append(entry)
    return out


def front_matter(report: Report, recipe: Recipe) -> str:
    """The card's YAML metadata (without the --- fences or a last newline), as huggingface_hub
    writes it."""
    from huggingface_hub import ModelCardData

    run, tr = report.run, report.trial
    provenance: dict[str, Any] = {
        "version": __version__,
        "run": run.name,
        "trial": tr.trial,
        "best": tr.is_best,
        "trials": run.trials,
        "fitness": {n: float(v) for n, v in zip(run.objectives, tr.fitness, strict=False)},
        "search_tasks": list(run.search_tasks),
        "heldout_tasks": list(run.heldout_tasks),
        "models": {"base": run.models.base, "sources": dict(run.models.sources)},
    }
    revisions = pinned_revisions(report, recipe)
    if revisions:
        provenance["revisions"] = revisions
    if report.scored and report.heldout:
        provenance["heldout_mean"] = {
            row.name: None if row.mean is None else round(float(row.mean), 6)
            for row in report.heldout
        }
    bases = hub_base_models(report, recipe)
    extra: dict[str, Any] = {"base_model_relation": "merge"} if bases else {}
    data = ModelCardData(
        base_model=bases or None,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["merge", "mergekit", "evomerge"],
        **extra,
        evomerge=provenance,
    )
    return data.to_yaml()


def _configuration(mk_reason: str | None, mergekit_yaml: str | None) -> str:
    """The mergekit config as mergekit's own card shows it, or why there is none."""
    if mk_reason is not None or not mergekit_yaml:
        return f"{_mergekit_line(mk_reason)}\n"
    return (
        "The following mergekit configuration (`mergekit.yaml`) reproduces these weights with "
        f"`mergekit-yaml mergekit.yaml OUT`:\n\n```yaml\n{mergekit_yaml.rstrip()}\n```\n"
    )


def model_card(
    report: Report,
    recipe: Recipe,
    mk_reason: str | None,
    files: list[str],
    mergekit_yaml: str | None = None,
) -> str:
    """README.md of the export; `mk_reason` is why there is no mergekit.yaml (None: there is,
    and `mergekit_yaml` is its text, shown in the card)."""
    run, tr = report.run, report.trial
    base = f"- base: `{run.models.base}`\n" if run.models.base else ""
    sources = "".join(f"- `{name}`: `{path}`\n" for name, path in run.models.sources.items())
    fitness = ", ".join(f"{n} = {v:.4f}" for n, v in zip(run.objectives, tr.fitness, strict=False))
    fit = report.search_fitness
    if fit is not None and fit.remeasured is not None:
        again = " / ".join(f"{v:.4f}" for v in fit.remeasured)
        fitness += f" as the study recorded it; {again} re-measured on every search item"
    scores = "".join(
        f"| {t} | {k} | {v:.4f} |\n" for t, m in tr.scores.items() for k, v in m.items()
    )
    plots = "".join(f"![{f}]({f})\n" for f in files if f.endswith(".png"))
    return f"""---
{front_matter(report, recipe)}
---
# {run.name}: evolved merge (trial {tr.trial})

Merged with evomerge {__version__}: an evolutionary search over
merge recipes. This checkpoint is trial {tr.trial} of run `{run.name}`
({run.trials} trials{", the best" if tr.is_best else ""}).

## Sources
{base}{sources}
## Method and search space
{_method_line(report, recipe)}
## Scores
Fitness: {fitness}.

| task | metric | value |
|---|---|---|
{scores}
### Held-out report
{markdown_heldout_table(report)}
## Configuration
{_configuration(mk_reason, mergekit_yaml)}
## Reproduce
- `recipe.yaml`: `evomerge merge recipe.yaml --out DIR` rebuilds these weights.
- {_mergekit_line(mk_reason)}

## Load
{LOAD}

## Plots
{plots}
"""
