"""HFLM around the resident model, subclassed so that work done per candidate is done once.

Two HFLM methods (lm-eval 0.4.13, `lm_eval.models.huggingface.HFLM`) are overridden:

- `_loglikelihood_tokens(requests, disable_tqdm, override_bs)`: the tokenized log-likelihood
  loop. `TemplateLM.loglikelihood(instances, disable_tqdm)` tokenizes the instances' args and
  hands the result to this method, so capturing its argument once gives lm-eval's own
  tokenization; for that very list it then replays the `LoglikelihoodPlan`.
- `tok_batch_encode(strings, padding_side, left_truncate_len, truncation)`: `generate_until`
  encodes the same prompt batches for every candidate; the tensors are only read (moved to the
  device and passed to generate), so one encoding per batch is enough.

Only the instances a scorer built get the subclass; lm-eval's classes are untouched.
"""

from __future__ import annotations

import functools
from typing import Any

from evomerge.scoring.lm_eval_adapter.loglikelihood import LoglikelihoodPlan
from evomerge.scoring.lm_eval_adapter.runtime import quiet_hflm


def resident_lm(model: Any, tokenizer: Any, batch_size: int) -> Any:
    """`HFLM(pretrained=model, tokenizer=tokenizer, batch_size=...)` (the public constructor for
    a model already in memory) as our subclass, without its warning about that."""
    with quiet_hflm():
        return _resident_lm_class()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


@functools.cache
def _resident_lm_class() -> type:
    from lm_eval.models.huggingface import HFLM

    class ResidentHFLM(HFLM):
        _capture: list | None = None

        _plans: dict | None = None  # id(request list) -> its LoglikelihoodPlan

        def _loglikelihood_tokens(self, requests, disable_tqdm=False, override_bs=None):
            if self._capture is not None:
                self._capture.extend(requests)
                return [(0.0, False)] * len(requests)
            plan = (self._plans or {}).get(id(requests))
            if plan is not None and plan.requests is requests:
                return plan.run(self)
            return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)

        def plan_loglikelihood(self, requests: list) -> None:
            """Plan `requests` (a list the caller keeps and passes again) for replay."""
            plan = LoglikelihoodPlan.build(self, requests)
            if plan is not None:
                self._plans = {**(self._plans or {}), id(requests): plan}

        _encoded: dict | None = None

        def tok_batch_encode(
            self, strings, padding_side="left", left_truncate_len=None, truncation=False
        ):
            key = (tuple(strings), padding_side, left_truncate_len, truncation)
            if self._encoded is None:
                self._encoded = {}
            if key not in self._encoded:
                self._encoded[key] = super().tok_batch_encode(
                    strings, padding_side, left_truncate_len, truncation
                )
            return self._encoded[key]

        def tokenize_loglikelihood(self, instances: list) -> list:
            """lm-eval's tokenized requests (context, continuation token lists) for these
            instances, in their order; planned for `run_loglikelihood`."""
            self._capture = []
            try:
                self.loglikelihood(instances, disable_tqdm=True)
                requests = self._capture
            finally:
                self._capture = None
            self.plan_loglikelihood(requests)
            return requests

        def run_loglikelihood(self, requests: list) -> list[tuple[float, bool]]:
            """(log-probability, is-greedy) per tokenized request: the plan's replay for the
            list `tokenize_loglikelihood` returned, lm-eval's own loop for any other."""
            return self._loglikelihood_tokens(requests, disable_tqdm=True)

    return ResidentHFLM
