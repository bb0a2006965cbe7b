"""Hugging Face checkpoint folders, read lazily tensor by tensor and written atomically.

Reading never loads a whole model: `CheckpointReader.get` opens the shard that holds one tensor.
Opening reads only headers and config.json, and refuses, with one user error naming the file, a
truncated or garbage shard, an index naming a missing shard or tensor, and a config.json that
disagrees with the weights (`checkpoint_check`). Writing lives in `merge.py` and
`safetensors_stream.py`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from evomerge import dtypes
from evomerge.checkpoint_check import config_mismatch
from evomerge.errors import CheckpointError, ConfigError, MissingPathError, UnsafeCheckpointError
from evomerge.hub_ref import is_hub_ref, split_revision
from evomerge.lora import AdapterRef, LoraAdapter, find_adapter
from evomerge.safetensors_stream import read_header

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
    """A local folder (an existing path wins, '@' in its name or not), or a hub id, pinned to a
    revision with mergekit's 'org/name@revision', already in the local cache (downloads only
    when not offline)."""
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir():
            raise MissingPathError(f"{where}: {ref} is a file; expected a checkpoint folder")
        return path.resolve()
    if is_hub_id(ref):
        return _from_hub(ref, path, where)
    raise MissingPathError(f"{where}: model folder {ref} does not exist")


def is_hub_id(ref: str) -> bool:
    """'org/name' or 'org/name@revision' that is no existing path: read as a hub id (resolved
    through the HF cache; `evomerge.hub_ref`)."""
    return is_hub_ref(ref)


# What a hub id brings into the HF cache (here and in `evomerge fetch`): safetensors weights and
# their index, config.json, generation_config.json, tokenizer files (tokenizer.json and _config,
# special_tokens_map, added_tokens, vocab.json/merges.txt/vocab.txt, sentencepiece *.model,
# *.tiktoken), chat templates (chat_template.jinja/.json, additional_chat_templates/) and PEFT
# adapters (adapter_config.json, adapter_model.safetensors). Pickled weights (*.bin, *.pt,
# *.pth, *.ckpt, *.pkl) match no pattern, so they never arrive. Safetensors in subfolders
# (Llama's original/, training checkpoints) and Mistral's consolidated.safetensors (a second
# copy of the sharded weights) are not the checkpoint transformers loads: skipped.
HUB_ALLOW_PATTERNS = ("*.safetensors", "*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja")
HUB_IGNORE_PATTERNS = ("*/*.safetensors", "consolidated*.safetensors")


def _from_hub(ref: str, path: Path, where: str) -> Path:
    """A hub id from the local cache, or downloaded unless the user turned downloads off
    (HF_HUB_OFFLINE, as huggingface_hub reads it); the error says which of the two failed and
    what to do (allow downloads or run `evomerge fetch` where the hub is reachable; check the id)."""
    from huggingface_hub import constants, snapshot_download

    offline = bool(constants.HF_HUB_OFFLINE)  # HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE)
    repo, revision = split_revision(ref)
    try:
        local = Path(
            snapshot_download(
                repo,
                revision=revision,
                allow_patterns=list(HUB_ALLOW_PATTERNS),
                ignore_patterns=list(HUB_IGNORE_PATTERNS),
                local_files_only=offline,
            )
        )
    except Exception as exc:  # hub errors come in many types; the message is what helps
        if offline:
            var = next(
                (v for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") if os.environ.get(v)),
                "HF_HUB_OFFLINE",
            )
            # an interrupted download: huggingface_hub's listing of the commit names the files
            # still missing (IncompleteSnapshotError: "... is incomplete: N file(s) are missing")
            missing = re.search(r"\d+ file\(s\) are missing \([^)]*\)", str(exc))
            cached = f"not in the hub cache ({constants.HF_HUB_CACHE})"
            held = cached_revisions(repo) if revision is not None else []
            if held:
                cached = (
                    f"revision {revision!r} of {repo!r} is not in the hub cache "
                    f"({constants.HF_HUB_CACHE} holds {', '.join(held)})"
                )
            if type(exc).__name__ == "IncompleteSnapshotError" and missing:
                cached = f"only partly in the hub cache ({constants.HF_HUB_CACHE}: {missing[0]})"
            raise MissingPathError(
                f"{where}: {ref!r} is no local folder ({path.resolve()} does not exist) and "
                f"{cached}; downloads are off "
                f"({var}={os.environ.get(var, '1')}): set {var}=0 to download it, or run "
                "`evomerge fetch STUDY.yaml` where the hub is reachable"
            ) from None
        detail = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
        detail = detail.removeprefix("Got: ")[:200]
        raise MissingPathError(
            f"{where}: {ref!r} is no local folder ({path.resolve()} does not exist) and could not "
            f"be downloaded from the hub ({type(exc).__name__}: {detail}); check the network and "
            f"the id{' and the revision' if revision else ''}: it may be misspelled, or a gated "
            "or private repo (log in with `hf auth login` or set HF_TOKEN)"
        ) from None
    if not any(local.glob("*.safetensors")):
        raise UnsafeCheckpointError(
            f"{where}: hub id {ref!r} has no safetensors weights (snapshot {local}); evomerge "
            "does not download pickled weights: use a safetensors revision or convert it"
        )
    return local


def cached_revisions(repo: str) -> list[str]:
    """The revisions of hub repo `repo` in the HF cache, for an error naming what is there:
    its refs (branches, tags) and the first 12 hex digits of each snapshot's commit."""
    from huggingface_hub import constants

    folder = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"
    refs = sorted(
        str(p.relative_to(folder / "refs")) for p in (folder / "refs").rglob("*") if p.is_file()
    )
    snapshots = sorted(p.name[:12] for p in (folder / "snapshots").glob("*") if p.is_dir())
    return refs + snapshots


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
        self.where = where
        self.lora: LoraAdapter | None = None
        adapter = find_adapter(self.ref, where)
        if adapter is not None:
            self._open_adapter(adapter, allow_pickle)
            return
        self.path = resolve_model_path(str(ref), where=where)
        adapter = find_adapter(str(self.path), where)  # a hub id naming an adapter
        if adapter is not None:
            self._open_adapter(adapter, allow_pickle)
            return
        self.location = str(self.path)  # what opens this checkpoint again (a worker's ModelSet)
        self.tokenizer_path = self.path
        self._pickled: dict[str, torch.Tensor] | None = None
        self._handles: dict[str, Any] = {}
        self.infos: dict[str, TensorInfo] = {}
        self._config = self._read_config()
        index = self.path / SAFE_INDEX
        single = self.path / SAFE_SINGLE
        weight_map: dict[str, str] = {}
        if index.exists():
            weight_map = self._read_index(index)
            files = sorted(set(weight_map.values()))
        elif single.exists():
            files = [SAFE_SINGLE]
        else:
            files = sorted(p.name for p in self.path.glob("*.safetensors"))
        if files:
            self._read_headers(files, weight_map)
        else:
            pickled = [self.path / n for n in PICKLE_NAMES if (self.path / n).exists()]
            if not pickled:
                raise MissingPathError(f"{where}: {self.path} holds no *.safetensors weights")
            if not allow_pickle:
                raise UnsafeCheckpointError(
                    f"{where}: {self.path} holds only pickled weights ({pickled[0].name}); pickles "
                    "can run code when loaded. Convert it to safetensors, or pass --allow-pickle "
                    "if you trust it"
                )
            self._load_pickled(pickled[0])
        self._check_config()

    def _open_adapter(self, ref: AdapterRef, allow_pickle: bool) -> None:
        """A LoRA adapter (`evomerge.lora`): its base's tensors, each adapted one W + scale B A
        when handed out; config (and tokenizer, unless the adapter has its own) of the base."""
        base = CheckpointReader(
            ref.base, allow_pickle=allow_pickle, where=f"{self.where} (the adapter's base)"
        )
        self.__dict__.update({k: v for k, v in base.__dict__.items() if k not in ("ref", "where")})
        self._base = base
        self.lora = LoraAdapter(ref, allow_pickle=allow_pickle, where=self.where)
        shapes = self.lora.shapes({n: i.shape for n, i in base.infos.items()})
        # adapted tensors name no safetensors file: readers of raw files then ask `get`
        self.infos = {
            n: TensorInfo(n, shapes[n], i.dtype, f"{i.file}#lora") if n in self.lora.targets else i
            for n, i in base.infos.items()
        }
        self._config = self.lora.config(base.config, {n: i.shape for n, i in base.infos.items()})
        self.location = ref.location
        self.tokenizer_path = ref.adapter if self.lora.has_tokenizer else base.path

    def _read_headers(self, files: list[str], weight_map: Mapping[str, str]) -> None:
        """Names, shapes and dtypes from each shard's header, checked against its size."""
        held: dict[str, Mapping[str, Any]] = {}
        for fname in files:
            fpath = self.path / fname
            if not fpath.exists():
                raise MissingPathError(f"{self.where}: shard {fpath} named in the index is missing")
            try:
                held[fname] = read_header(fpath)
            except CheckpointError as exc:
                raise CheckpointError(f"{self.where}: {exc}") from None
            for name, stored in held[fname].items():
                self.infos[name] = TensorInfo(name, stored.shape, stored.dtype, fname)
        for name, fname in weight_map.items():
            if name not in held[fname]:
                raise CheckpointError(
                    f"{self.where}: {self.path / SAFE_INDEX} puts tensor {name!r} in {fname}, "
                    "which does not hold it"
                )

    def _read_index(self, index: Path) -> dict[str, str]:
        try:
            weight_map = json.loads(index.read_text()).get("weight_map")
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            weight_map = None
        if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) for v in weight_map.values()
        ):
            raise CheckpointError(
                f"{self.where}: {index} is corrupt: no JSON object with a weight_map of tensor "
                "names to shard files"
            )
        return weight_map

    def _read_config(self) -> dict[str, Any]:
        cfg = self.path / "config.json"
        if not cfg.exists():
            return {}
        try:
            data = json.loads(cfg.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{self.where}: {cfg} is not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"{self.where}: {cfg} is not a JSON object")
        return data

    def _check_config(self) -> None:
        """config.json must describe these weights (checkpoint_check says why)."""
        problem = config_mismatch(
            self._config,
            {n: i.shape for n, i in self.infos.items()},
            {n: layer_index(n) for n in self.infos},
        )
        if problem:
            raise CheckpointError(
                f"{self.where}: {self.path / 'config.json'} does not match its weights: {problem}"
            )

    def _load_pickled(self, path: Path) -> None:
        files = [path]
        if path.name.endswith(".index.json"):
            files = sorted(
                {self.path / f for f in json.loads(path.read_text())["weight_map"].values()}
            )
        self._pickled = {}
        for f in files:
            try:
                self._pickled.update(torch.load(f, map_location="cpu", weights_only=True))
            except Exception as exc:  # torch.load raises many types; the file is what matters
                line = (str(exc).splitlines() or [""])[0][:200]
                raise CheckpointError(
                    f"{self.where}: {f} could not be loaded ({type(exc).__name__}: {line})"
                ) from None
        for name, t in self._pickled.items():
            dt = dtypes.torch_name(t.dtype)
            code = dtypes.SAFETENSORS.get(dt, dt.upper())  # as a safetensors header says it
            self.infos[name] = TensorInfo(name, tuple(t.shape), code, path.name)

    @property
    def config(self) -> dict[str, Any]:
        """config.json as read when the reader opened ({} without one); a copy."""
        return dict(self._config)

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
        if self.lora is not None and name in self.lora.targets:
            t = self.lora.apply(name, self._base.get(name))
        elif self._pickled is not None:
            t = self._pickled[name]
        else:
            info = self.infos[name]
            handle = self._handles.get(info.file)
            if handle is None:
                try:
                    handle = safe_open(str(self.path / info.file), framework="pt")
                except Exception as exc:  # SafetensorError: the file changed since it was opened
                    raise CheckpointError(
                        f"{self.where}: {self.path / info.file} can no longer be read ({exc})"
                    ) from None
                self._handles[info.file] = handle
            t = handle.get_tensor(name)
        return t.to(device=device, dtype=dtype or t.dtype)

    def close(self) -> None:
        self._handles.clear()


def iter_state(reader: CheckpointReader) -> Iterator[tuple[str, torch.Tensor]]:
    for name in reader.names():
        yield name, reader.get(name)
