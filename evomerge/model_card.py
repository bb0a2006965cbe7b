"""The model card (README.md) of an exported merge, written from its `Report` and recipe alone:
provenance (sources, search space, optimizer, trials), scores, how to rebuild and load it."""

from __future__ import annotations

import json

from evomerge import __version__
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


def model_card(report: Report, recipe: Recipe, mk_reason: str | None, files: list[str]) -> str:
    """README.md of the export; `mk_reason` is why there is no mergekit.yaml (None: there is)."""
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
library_name: transformers
tags: [merge, evomerge]
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
## Reproduce
- `recipe.yaml`: `evomerge merge recipe.yaml --out DIR` rebuilds these weights.
- {_mergekit_line(mk_reason)}

## Load
{LOAD}

## Plots
{plots}
"""
