"""The one place evomerge relies on lm-eval's internals (tested with lm-eval 0.4.13).

lm-eval's public API is `simple_evaluate` / `evaluate`, `TaskManager` and the `HFLM`
constructor. The resident scorer needs more: it splits `evaluator.evaluate` into build-once and
run-per-candidate, which means driving Task and Group objects, HFLM's request loop and the task
index itself. Every such use lives in this package, each with a comment naming the lm-eval
function or attribute it relies on; the rest of `evomerge.scoring` imports only from here and
from lm-eval's public API.

- `runtime`: simple_evaluate's seeds, lm-eval's logger names and the messages we silence.
- `index`: the task index (`lm_eval.tasks._index`), its YAML loader, the metric registry and the
  folder of built-in task YAMLs, read without building any task.
- `model`: the HFLM subclass (request capture, prompt-encoding cache), and `loglikelihood`, its
  log-likelihood loop planned once and replayed.
- `tasks`: the per-task part of `evaluator.evaluate`: overrides, requests, filters, per-document
  metrics, aggregation, groups.

pyproject.toml bounds lm-eval to the versions tested here. Before widening the bound, run the
tests of tests/test_scoring.py that compare the scorer with `simple_evaluate` (and
tests/test_scoring_adapter.py): they fail when an upgrade changes what this package relies on.
Importing this package imports neither lm_eval nor torch: each function imports what it needs.
"""

from __future__ import annotations

TESTED_LM_EVAL = "0.4.13"  # the lm-eval version every use below was read from and tested with
