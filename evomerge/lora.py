"""LoRA adapters as sources: a PEFT adapter folder, or mergekit's `base+adapter`, read as the
full model it stands for, W' = W + scale * B A for every adapted weight.

The equation is peft's (`LoraLayer.get_delta_weight` and `merge`, peft 0.21): scale =
lora_alpha / r (lora_alpha / sqrt(r) with use_rslora; `rank_pattern` and `alpha_pattern` per
module, matched as peft matches them), the product transposed for `fan_in_fan_out` (GPT-2's Conv1D)
and for embeddings (`lora_embedding_A/B`); modules saved whole (`modules_to_save`, resized
embeddings) replace the base's. It is applied tensor by tensor as a checkpoint reader hands them
out, so a merge still holds one tensor per source and a worker merges each adapter into its base
once, when it loads its sources; tests check it against peft's `merge_and_unload`. Variants whose
merge is another equation (DoRA, LoRA biases, other PEFT types) are refused in one line.

A leaf module (torch, safetensors): `checkpoint.CheckpointReader` opens adapters through it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from evomerge.errors import CheckpointError, ConfigError, MissingPathError, UnsafeCheckpointError

ADAPTER_CONFIG = "adapter_config.json"
SAFE_ADAPTER = "adapter_model.safetensors"
PICKLE_ADAPTER = "adapter_model.bin"
PREFIX = "base_model.model."  # peft's prefix of every saved key
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


@dataclass(frozen=True)
class AdapterRef:
    """A source that is an adapter: its base model (a path or hub id) and its folder."""

    base: str
    adapter: Path

    @property
    def location(self) -> str:
        """The reference that opens it again (mergekit's syntax)."""
        return f"{self.base}+{self.adapter}"


def is_adapter_folder(path: Path) -> bool:
    """A folder with adapter_config.json and no full weights of its own."""
    return (
        path.is_dir()
        and (path / ADAPTER_CONFIG).exists()
        and not any((path / n).exists() for n in _WEIGHTS)
    )


def find_adapter(ref: str, where: str) -> AdapterRef | None:
    """`ref` as an adapter: 'base+adapter' (mergekit's ModelReference syntax, when no folder of
    that name exists) or an adapter folder whose adapter_config.json names its base
    (`base_model_name_or_path`); None when `ref` is no adapter."""
    path = Path(ref).expanduser()
    if path.exists():
        if not is_adapter_folder(path):
            return None
        base = _config(path, where).get("base_model_name_or_path")
        if not isinstance(base, str) or not base:
            raise ConfigError(
                f"{where}: LoRA adapter {path} names no base model (base_model_name_or_path in "
                f"{ADAPTER_CONFIG}); give it as BASE+{path}"
            )
        if not Path(base).is_absolute() and (path / base).exists():  # relative to the adapter
            base = str((path / base).resolve())
        return AdapterRef(base, path.resolve())
    if "+" not in ref:
        return None
    chunks = ref.split("+")
    if len(chunks) != 2 or not all(chunks):
        raise ConfigError(f"{where}: {ref!r} is not BASE+ADAPTER (mergekit's LoRA syntax)")
    adapter = Path(chunks[1]).expanduser()
    if not (adapter / ADAPTER_CONFIG).exists():
        raise MissingPathError(
            f"{where}: {ref!r}: {adapter} is no LoRA adapter folder (no {ADAPTER_CONFIG}); "
            "adapters are read from local folders"
        )
    return AdapterRef(chunks[0], adapter.resolve())


def _config(path: Path, where: str) -> dict[str, Any]:
    try:
        data = json.loads((path / ADAPTER_CONFIG).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"{where}: {path / ADAPTER_CONFIG} is not valid JSON ({exc})"
        ) from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{where}: {path / ADAPTER_CONFIG} is not a JSON object")
    return data


def _pattern(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """peft's get_pattern_key: the first key that ends the module's name at a dot boundary."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


@dataclass(frozen=True)
class _Delta:
    a: torch.Tensor  # (r, in); embeddings: (r, rows)
    b: torch.Tensor  # (out, r); embeddings: (dim, r)
    scale: float
    transpose: bool

    def value(self) -> torch.Tensor:
        d = self.b.float() @ self.a.float()
        return (d.T if self.transpose else d) * self.scale


class LoraAdapter:
    """One adapter's weights, ready to apply to its base's tensors by name."""

    def __init__(self, ref: AdapterRef, *, allow_pickle: bool, where: str) -> None:
        self.ref = ref
        self.where = where
        cfg = _config(ref.adapter, where)
        kind = cfg.get("peft_type", "LORA")
        unsupported = [
            what
            for what, on in (
                (f"peft_type {kind}", kind != "LORA"),
                ("use_dora", cfg.get("use_dora")),
                ("lora_bias", cfg.get("lora_bias")),
                ("target_parameters", cfg.get("target_parameters")),
                ("trainable_token_indices", cfg.get("trainable_token_indices")),
            )
            if on
        ]
        if unsupported:
            raise ConfigError(
                f"{where}: adapter {ref.adapter} uses {unsupported[0]}, which merges by another "
                "equation than W + scale * B A; merge it with peft (merge_and_unload) and give "
                "that folder"
            )
        tensors = self._weights(allow_pickle)
        self.deltas: dict[str, _Delta] = {}
        self.replaced: dict[str, torch.Tensor] = {}
        parts: dict[str, dict[str, torch.Tensor]] = {}
        embedding: set[str] = set()
        for key, t in tensors.items():
            name = key.removeprefix(PREFIX)
            for suffix, part, emb in (
                (".lora_A.weight", "a", False),
                (".lora_B.weight", "b", False),
                (".lora_embedding_A", "a", True),
                (".lora_embedding_B", "b", True),
            ):
                if name.endswith(suffix):
                    module = name[: -len(suffix)]
                    parts.setdefault(module, {})[part] = t
                    if emb:
                        embedding.add(module)
                    break
            else:
                if "lora_" in name:
                    raise ConfigError(
                        f"{where}: adapter {ref.adapter} holds {key!r}, a LoRA tensor evomerge "
                        "does not apply; merge it with peft (merge_and_unload) and give that folder"
                    )
                # saved whole: modules_to_save, and the embeddings of an adapter that adapts or
                # resizes them (peft's save_embedding_layers, as `<module>.base_layer.weight`)
                self.replaced[name.replace(".base_layer.", ".")] = t
        r0 = int(cfg.get("r", 8))
        alpha0 = float(cfg.get("lora_alpha", 8))
        for module, p in parts.items():
            if "a" not in p or "b" not in p:
                raise CheckpointError(
                    f"{where}: adapter {ref.adapter} has only half of module {module!r} (A or B)"
                )
            r = int(_pattern(cfg.get("rank_pattern") or {}, module, r0))
            alpha = float(_pattern(cfg.get("alpha_pattern") or {}, module, alpha0))
            scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
            transpose = module in embedding or bool(cfg.get("fan_in_fan_out"))
            self.deltas[f"{module}.weight"] = _Delta(p["a"], p["b"], scale, transpose)

    def _weights(self, allow_pickle: bool) -> dict[str, torch.Tensor]:
        safe = self.ref.adapter / SAFE_ADAPTER
        if safe.exists():
            from safetensors.torch import load_file

            try:
                return load_file(str(safe))
            except Exception as exc:  # SafetensorError: truncated or garbage
                raise CheckpointError(f"{self.where}: {safe} could not be read ({exc})") from None
        pickled = self.ref.adapter / PICKLE_ADAPTER
        if not pickled.exists():
            raise MissingPathError(
                f"{self.where}: adapter {self.ref.adapter} holds no {SAFE_ADAPTER}"
            )
        if not allow_pickle:
            raise UnsafeCheckpointError(
                f"{self.where}: adapter {self.ref.adapter} holds only pickled weights "
                f"({PICKLE_ADAPTER}); pickles can run code when loaded. Convert it to safetensors, "
                "or pass --allow-pickle if you trust it"
            )
        try:
            return dict(torch.load(pickled, map_location="cpu", weights_only=True))
        except Exception as exc:  # torch.load raises many types; the file is what matters
            line = (str(exc).splitlines() or [""])[0][:200]
            raise CheckpointError(
                f"{self.where}: {pickled} could not be loaded ({type(exc).__name__}: {line})"
            ) from None

    def shapes(self, base: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        """The adapted model's shapes from the base's; a target the base lacks, or a product
        whose shape is not its weight's, is refused naming both."""
        out = dict(base)
        for name, t in self.replaced.items():
            if name not in base:
                raise CheckpointError(
                    f"{self.where}: adapter {self.ref.adapter} saves {name!r}, which its base "
                    f"{self.ref.base} does not have: is it the adapter of another model?"
                )
            out[name] = tuple(t.shape)
        for name, d in self.deltas.items():
            shape = out.get(name)  # after a resized embedding replaced it
            out_in = (d.b.shape[0], d.a.shape[1])
            rows, cols = out_in[::-1] if d.transpose else out_in
            if shape is None or tuple(shape) != (rows, cols):
                got = "missing" if shape is None else f"of shape {list(shape)}"
                raise CheckpointError(
                    f"{self.where}: adapter {self.ref.adapter} adapts {name!r} as "
                    f"[{rows}, {cols}], but in its base {self.ref.base} it is {got}: is it the "
                    "adapter of another model?"
                )
        return out

    def apply(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """The adapted tensor `name`, in the base tensor's dtype (computed in float32)."""
        w = self.replaced.get(name, tensor)
        d = self.deltas.get(name)
        if d is None:
            return w.to(tensor.dtype)
        return (w.float() + d.value()).to(tensor.dtype)

    @property
    def targets(self) -> frozenset[str]:
        """The tensors the adapter changes."""
        return frozenset(self.deltas) | frozenset(self.replaced)

    def config(
        self, base: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]
    ) -> dict[str, Any]:
        """The base's config.json, with vocab_size following embeddings the adapter saved
        resized (tokens added while training it)."""
        out = dict(base)
        rows = out.get("vocab_size")
        for name, t in self.replaced.items():
            if isinstance(rows, int) and shapes[name][0] == rows and t.shape[0] != rows:
                out["vocab_size"] = int(t.shape[0])
        return out

    @property
    def has_tokenizer(self) -> bool:
        return any(
            (self.ref.adapter / n).exists() for n in ("tokenizer.json", "tokenizer_config.json")
        )
