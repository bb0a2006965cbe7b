"""The output ensemble of the parents: the reference a merge tries to approach in one model.

p(token | context) = (1/M) sum_i p_i(token | context). The wrapper looks like a causal LM to
lm-eval's HFLM: `forward` returns logits = log of the mean probabilities (a log-softmax is then a
no-op), and `generate` decodes without a KV cache, recomputing every step (slow, exact).

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
        super().__init__(copy.deepcopy(models[0].config))  # never touch the members' config
        # registered as submodules: .device, .parameters() and .eval() then see the members
        self.members = torch.nn.ModuleList(dict.fromkeys(models))  # one copy of a shared model
        self._members = list(zip(models, activators, strict=True))

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
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        for key in ("past_key_values", "use_cache", "cache_position", "return_dict", "labels"):
            kwargs.pop(key, None)
        total: torch.Tensor | None = None
        for model, activate in self._members:
            activate()
            out = model(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs
            )
            logp = torch.log_softmax(out.logits.float(), dim=-1)  # (B, T, V)
            total = logp if total is None else torch.logaddexp(total, logp)
        assert total is not None
        return CausalLMOutputWithPast(logits=total - math.log(len(self._members)))

    def prepare_inputs_for_generation(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        """Without a cache every step sees the whole sequence."""
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["use_cache"] = False
        return super().generate(*args, **kwargs)
