"""The output ensemble of the parents: the reference a merge tries to approach in one model.

p(token | context) = (1/M) sum_i p_i(token | context). The wrapper looks like a causal LM to
lm-eval's HFLM: `forward` returns logits = log of the mean probabilities (a log-softmax is then a
no-op); `generate` runs the usual generation loop without its cache, while each member keeps its
own KV cache (one cache cannot hold M models' keys and values).

Members are (model, activate) pairs: `swapping` runs one live model M times per forward, swapping
each parent's weights in from the worker's resident sources first (no extra memory beyond the
worker's); `of_models` holds M separate models (simple, M times the memory).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

# The KV cache's argument and output field: `cache` since transformers 5.x deprecated
# `past_key_values` (a FutureWarning on every forward); older releases know only the latter.
CACHE_ARG = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _noop() -> None:
    return None


class EnsembleForCausalLM(PreTrainedModel, GenerationMixin):
    """Mean of the members' next-token distributions, as a causal LM."""

    # the members run their own attention; these only stop the base class from vetoing it
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True

    def __init__(
        self, models: Sequence[torch.nn.Module], activators: Sequence[Callable[[], Any]]
    ) -> None:
        if not models or len(models) != len(activators):
            raise ValueError("an ensemble needs one activator per member and at least one member")
        config = copy.deepcopy(models[0].config)  # never touch the members' config
        # a MoE member's config names its experts kernel (grouped_mm), which transformers
        # would check against this class and refuse; the members run their own experts
        config._experts_implementation = None
        super().__init__(config)
        # registered as submodules: .device, .parameters() and .eval() then see the members
        self.members = torch.nn.ModuleList(dict.fromkeys(models))  # one copy of a shared model
        self._members = list(zip(models, activators, strict=True))
        self._caches: list[Any] | None = None  # one KV cache per member while generating
        self._prefix: torch.Tensor | None = None  # the sequence those caches hold

    @classmethod
    def swapping(
        cls, model: torch.nn.Module, activators: Sequence[Callable[[], Any]]
    ) -> EnsembleForCausalLM:
        """One live model; `activators[i]()` loads parent i's weights into it."""
        return cls([model] * len(activators), activators)

    @classmethod
    def of_models(cls, models: Sequence[torch.nn.Module]) -> EnsembleForCausalLM:
        return cls(models, [_noop] * len(models))

    def get_input_embeddings(self) -> torch.nn.Module:
        return self._members[0][0].get_input_embeddings()

    def tie_weights(self, *args: Any, **kwargs: Any) -> None:
        """The members own their weights (and ties); nothing to tie here."""

    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """logits = log mean_i softmax(member_i(input)); (B, T, V) in float32.

        Inside `generate`, each call extends the previous sequence: the members then run only
        the new tokens against their own KV caches, and the logits cover those tokens only
        (generation reads the last position).
        """
        for key in (CACHE_ARG, "use_cache", "cache_position", "return_dict", "labels"):
            kwargs.pop(key, None)
        start = self._cached_prefix(input_ids) if self._caches is not None else 0
        if self._caches is not None and start == 0:
            self._caches = [None] * len(self._members)
        new_ids = input_ids[:, start:] if input_ids is not None else None
        positions = position_ids[:, start:] if position_ids is not None else None
        total: torch.Tensor | None = None
        for i, (model, activate) in enumerate(self._members):
            activate()
            out = model(
                input_ids=new_ids,
                attention_mask=attention_mask,
                position_ids=positions,
                use_cache=self._caches is not None,
                **{CACHE_ARG: self._caches[i] if self._caches is not None else None},
                **kwargs,
            )
            if self._caches is not None:
                self._caches[i] = getattr(out, CACHE_ARG)
            logp = torch.log_softmax(out.logits.float(), dim=-1)  # (B, T, V)
            total = logp if total is None else torch.logaddexp(total, logp)
        assert total is not None
        if self._caches is not None:
            self._prefix = input_ids
        return CausalLMOutputWithPast(logits=total - math.log(len(self._members)))

    def _cached_prefix(self, input_ids: torch.Tensor | None) -> int:
        """Length of the previous call's sequence when `input_ids` extends it, else 0."""
        prev = self._prefix
        if (
            prev is None
            or input_ids is None
            or prev.shape[0] != input_ids.shape[0]
            or prev.shape[1] >= input_ids.shape[1]
            or not torch.equal(input_ids[:, : prev.shape[1]], prev)
        ):
            return 0
        return prev.shape[1]

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The generation loop passes the whole sequence every step (no outer cache); the members
        keep one KV cache each, valid within this call."""
        kwargs["use_cache"] = False
        self._caches, self._prefix = [None] * len(self._members), None
        try:
            return super().generate(*args, **kwargs)
        finally:
            self._caches, self._prefix = None, None
