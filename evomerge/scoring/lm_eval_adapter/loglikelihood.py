"""lm-eval's log-likelihood loop, planned once per scorer and replayed for every candidate.

`HFLM._loglikelihood_tokens` rebuilds, on every call, the request order (its `Collator`), one
input tensor per request, the padded batches and the one-token-continuation groups, then picks
the answers apart with ~10 small tensor ops per request: on the demo zoo (288 requests) that was
0.03 s of a 0.25 s candidate, all of it identical from one candidate to the next. The plan runs
lm-eval's own `Collator` once, with the same sort and grouping keys and the same batches, and
keeps the padded inputs and, per answer, its row, positions and continuation tokens. A replay
does the forward passes and lm-eval's `log_softmax`, then one gather and one argmax per batch;
each answer's log-probability is still the float32 `sum()` of its own slice, as lm-eval sums it,
so the numbers are the same bit for bit (the scorer tests compare with `simple_evaluate`).

Only the causal backend with a fixed batch size is planned; anything else runs lm-eval's loop.

What this relies on in lm-eval 0.4.13 (`lm_eval.models.huggingface.HFLM._loglikelihood_tokens`):
its `_collate` sort key and `_lookup_one_token_cont` group key (copied below); `Collator`
(`lm_eval.models.utils`: get_batched, get_cache, get_original); `pad_and_concat`
(`lm_eval.models.utils_hf`, right padding); the causal input, the last `max_length` tokens of
context + continuation but the final one; `_model_call(inputs)` returning logits; its
`log_softmax(dim=-1, dtype=softmax_dtype)` and float32 `sum()` per answer; and the HFLM
attributes `backend`, `batch_size`, `logits_cache`, `max_length`, `softmax_dtype`, `device`.
tests/test_scoring_adapter.py compares the replay with `HFLM._loglikelihood_tokens` itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class _Batch:
    inputs: Any  # (B, T) token ids, right-padded as lm-eval pads them
    rows: Any  # (N,) batch row of every scored continuation token
    positions: Any  # (N,) its position in the row
    tokens: Any  # (N,) the continuation token
    spans: list[tuple[int, int]]  # per answer, its slice of the N tokens


@dataclass
class LoglikelihoodPlan:
    requests: list  # the very list the scorer passes (identity marks a planned call)
    batches: list[_Batch]
    order: list[int]  # answer index (in planned order) for each request, in request order

    @classmethod
    def build(cls, lm: Any, requests: list) -> LoglikelihoodPlan | None:
        """The plan, or None where lm-eval's own loop must run (see the module docstring)."""
        import torch
        from lm_eval.models.utils import Collator
        from lm_eval.models.utils_hf import pad_and_concat

        # HFLM.backend is "causal" or "seq2seq"; batch_size is "auto"/"auto:N" or an int
        if lm.backend != "causal" or not isinstance(lm.batch_size, int) or not requests:
            return None

        def sort_key(req: Any) -> tuple[int, tuple[int, ...]]:  # as lm-eval's _collate
            toks = req[1] + req[2]
            return -len(toks), tuple(toks)

        def group_key(req: Any) -> list[int]:  # as lm-eval's _lookup_one_token_cont
            return req[-2] + req[-1][:-1]

        # as _loglikelihood_tokens builds it: group one-token continuations only with logits_cache
        re_ord = Collator(
            requests,
            sort_fn=sort_key,
            group_by="contexts" if lm.logits_cache else None,
            group_fn=group_key,
        )
        batches: list[_Batch] = []
        n_answers = 0
        for chunk in re_ord.get_batched(n=lm.batch_size, batch_fn=None):
            # _loglikelihood_tokens' causal input: the last max_length tokens but the final one
            inputs = [
                torch.tensor((ctx + cont)[-(lm.max_length + 1) :][:-1], dtype=torch.long)
                for _, ctx, cont in chunk
            ]
            width = max(len(t) for t in inputs)
            rows: list[int] = []
            positions: list[int] = []
            tokens: list[int] = []
            spans: list[tuple[int, int]] = []
            for row, ((req_str, ctx, cont), inp) in enumerate(zip(chunk, inputs, strict=True)):
                inplen, contlen = len(inp), len(cont)
                # Collator.get_cache yields (req_str, cont_toks, logits) per request sharing this
                # row; it only expands the logits, so a placeholder stands in for them
                placeholder = torch.empty(1, contlen, 0)
                for _, cont_toks, _ in re_ord.get_cache(
                    req_str=req_str, cxt_toks=ctx, cont_toks=cont, logits=placeholder
                ):
                    if len(cont_toks) != contlen:  # lm-eval's trailing-slice corner: not planned
                        return None
                    spans.append((len(tokens), len(tokens) + contlen))
                    rows += [row] * contlen
                    positions += range(inplen - contlen, inplen)
                    tokens += cont_toks
                    n_answers += 1
            batches.append(
                _Batch(
                    inputs=pad_and_concat(width, inputs, padding_side="right").to(lm.device),
                    rows=torch.tensor(rows, device=lm.device),
                    positions=torch.tensor(positions, device=lm.device),
                    tokens=torch.tensor(tokens, device=lm.device),
                    spans=spans,
                )
            )
        order = re_ord.get_original(list(range(n_answers)))
        return cls(requests, batches, list(order))

    def run(self, lm: Any) -> list[tuple[float, bool]]:
        """(log-probability, is-greedy) per request, as `_loglikelihood_tokens` returns them."""
        import torch
        import torch.nn.functional as F

        answers: list[tuple[float, bool]] = []
        for b in self.batches:
            # HFLM._model_call(inps) -> logits, and the log_softmax _loglikelihood_tokens applies
            logp = F.log_softmax(lm._model_call(b.inputs), dim=-1, dtype=lm.softmax_dtype)
            scored = logp[b.rows, b.positions]  # (N, vocab)
            values = scored.gather(1, b.tokens.unsqueeze(1)).squeeze(1)
            greedy = (scored.argmax(dim=-1) == b.tokens).tolist()
            # one sum() per answer over its own slice, as lm-eval sums it: the same float32 bits
            sums = torch.stack([values[i:j].sum() for i, j in b.spans]).tolist()
            answers += [(s, all(greedy[i:j])) for s, (i, j) in zip(sums, b.spans, strict=True)]
        return [answers[k] for k in self.order]
