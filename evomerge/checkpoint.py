"""Hugging Face checkpoint folders, read lazily tensor by tensor and written atomically.

Reading never loads a whole model: `CheckpointReader.get` opens the shard that holds one tensor.
Writing lives in `merge.py` and `safetensors_stream.py`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from evomerge import dtypes
from evomerge.errors import ConfigError, MissingPathError, UnsafeCheckpointError

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.bin")
# Files copied next to the merged weights so the result loads with from_pretrained.
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)
# One parser of block indices in tensor names: llama/neox `layers.N.`, gpt2 `h.N.`, `blocks.N.`.
_LAYER_RE = re.compile(r"((?:^|\.)(?:layers|h|blocks|layer)\.)(\d+)(\.)")


def parse_dtype(name: str | torch.dtype | None, where: str = "dtype") -> torch.dtype | None:
    """'bfloat16' -> torch.bfloat16; None stays None (meaning: keep the source dtype)."""
    if name is None or isinstance(name, torch.dtype):
        return name
    canonical = dtypes.ALIASES.get(str(name).lower())
    if canonical is None:
        raise ConfigError(
            f"{where}: unknown dtype {name!r} (use one of {', '.join(dtypes.CHOICES)})"
        )
    return getattr(torch, canonical)


def stored_float_dtype(code: str) -> torch.dtype:
    """The float dtype of a safetensors header code ('BF16' -> torch.bfloat16); float32 for
    anything else (ints, bools), the dtype a merge of such a tensor is computed in."""
    name = dtypes.from_safetensors(code)
    return getattr(torch, name) if name in dtypes.FLOATS else torch.float32


def layer_index(tensor_name: str) -> int | None:
    """Transformer block index of a tensor name ('model.layers.3.mlp...' -> 3), None outside blocks."""
    m = _LAYER_RE.search(tensor_name)
    return int(m.group(2)) if m else None


def with_layer_index(tensor_name: str, index: int) -> str:
    """The same tensor in block `index`: ('model.layers.3.mlp.w', 5) -> 'model.layers.5.mlp.w'."""
    return _LAYER_RE.sub(lambda m: f"{m.group(1)}{index}{m.group(3)}", tensor_name, count=1)


def layer_suffix(tensor_name: str) -> str | None:
    """The part after the block index, dot included ('model.layers.3.mlp.w' -> '.mlp.w'): the
    tensor's kind, the same in every block. None outside blocks."""
    m = _LAYER_RE.search(tensor_name)
    return tensor_name[m.end(2) :] if m else None


def resolve_model_path(ref: str, *, where: str = "model") -> Path:
    """A local folder, or a hub id already in the local cache (downloads only when not offline)."""
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir():
            raise MissingPathError(f"{where}: {ref} is a file; expected a checkpoint folder")
        return path.resolve()
    if re.fullmatch(r"[\w.-]+/[\w.-]+", ref) and not ref.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download

            local = snapshot_download(
                ref,
                allow_patterns=["*.safetensors", "*.json", "tokenizer*", "*.model", "*.txt"],
                local_files_only=os.environ.get("HF_HUB_OFFLINE", "0") == "1",
            )
            return Path(local)
        except Exception as exc:  # hub errors come in many types; the message is what helps
            raise MissingPathError(
                f"{where}: {ref!r} is not a local folder and could not be fetched from the hub "
                f"({type(exc).__name__}); set HF_HUB_OFFLINE=0 to allow downloads"
            ) from None
    raise MissingPathError(f"{where}: model folder {ref} does not exist")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype string, e.g. 'BF16'
    file: str


class CheckpointReader:
    """Lazy view of one checkpoint folder: names, shapes and tensors one at a time."""

    def __init__(
        self, ref: str | Path, *, allow_pickle: bool = False, where: str = "model"
    ) -> None:
        self.ref = str(ref)
        self.path = resolve_model_path(str(ref), where=where)
        self._pickled: dict[str, torch.Tensor] | None = None
        self._handles: dict[str, Any] = {}
        self.infos: dict[str, TensorInfo] = {}
        index = self.path / SAFE_INDEX
        single = self.path / SAFE_SINGLE
        if index.exists():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif single.exists():
            files = [SAFE_SINGLE]
        else:
            files = sorted(p.name for p in self.path.glob("*.safetensors"))
        if files:
            for fname in files:
                fpath = self.path / fname
                if not fpath.exists():
                    raise MissingPathError(f"{where}: shard {fpath} named in the index is missing")
                with safe_open(str(fpath), framework="pt") as f:
                    for name in f.keys():  # noqa: SIM118 (safe_open is no dict)
                        sl = f.get_slice(name)
                        self.infos[name] = TensorInfo(
                            name, tuple(sl.get_shape()), sl.get_dtype(), fname
                        )
            return
        pickled = [self.path / n for n in PICKLE_NAMES if (self.path / n).exists()]
        if not pickled:
            raise MissingPathError(f"{where}: {self.path} holds no *.safetensors weights")
        if not allow_pickle:
            raise UnsafeCheckpointError(
                f"{where}: {self.path} holds only pickled weights ({pickled[0].name}); pickles can "
                "run code when loaded. Convert it to safetensors, or pass --allow-pickle if you trust it"
            )
        self._load_pickled(pickled[0])

    def _load_pickled(self, path: Path) -> None:
        files = [path]
        if path.name.endswith(".index.json"):
            files = sorted(
                {self.path / f for f in json.loads(path.read_text())["weight_map"].values()}
            )
        self._pickled = {}
        for f in files:
            self._pickled.update(torch.load(f, map_location="cpu", weights_only=True))
        for name, t in self._pickled.items():
            dt = dtypes.torch_name(t.dtype)
            code = dtypes.SAFETENSORS.get(dt, dt.upper())  # as a safetensors header says it
            self.infos[name] = TensorInfo(name, tuple(t.shape), code, path.name)

    @property
    def config(self) -> dict[str, Any]:
        cfg = self.path / "config.json"
        return json.loads(cfg.read_text()) if cfg.exists() else {}

    @property
    def num_layers(self) -> int:
        n = self.config.get("num_hidden_layers")
        if isinstance(n, int):
            return n
        idx = [i for i in (layer_index(k) for k in self.infos) if i is not None]
        return max(idx) + 1 if idx else 0

    def names(self) -> list[str]:
        return list(self.infos)

    def __contains__(self, name: object) -> bool:
        return name in self.infos

    def get(
        self, name: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """One tensor, optionally moved and cast (the file's dtype otherwise)."""
        if self._pickled is not None:
            t = self._pickled[name]
        else:
            info = self.infos[name]
            handle = self._handles.get(info.file)
            if handle is None:
                handle = safe_open(str(self.path / info.file), framework="pt")
                self._handles[info.file] = handle
            t = handle.get_tensor(name)
        return t.to(device=device, dtype=dtype or t.dtype)

    def close(self) -> None:
        self._handles.clear()


def iter_state(reader: CheckpointReader) -> Iterator[tuple[str, torch.Tensor]]:
    for name in reader.names():
        yield name, reader.get(name)
