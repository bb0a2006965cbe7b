"""Build the demo zoo: pre-train a tiny Llama base, fine-tune one model per skill, save them all.

The zoo is reused when `DIR/zoo.json` records the same build hash (settings, zoo source code,
torch and transformers versions); otherwise, or with `force`, it is rebuilt. Training is seeded
and deterministic, so a rebuild gives bit-identical safetensors on the same software.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import evomerge.zoo.data as data
import evomerge.zoo.tasks as tasks
from evomerge.errors import MissingPathError
from evomerge.zoo.tokenizer import save_tokenizer
from evomerge.zoo.train import ModelShape, TrainConfig, deterministic, new_model, train

MARKER = "zoo.json"
STUDY = "study.yaml"


@dataclass(frozen=True)
class ZooSettings:
    """Everything that decides the zoo's weights (hashed into the marker)."""

    shape: ModelShape
    pretrain: TrainConfig
    finetunes: tuple[tuple[str, TrainConfig], ...]
    replay: float  # share of each fine-tuning batch drawn from the pre-training mixture
    mix: tuple[tuple[str, float], ...] = tuple(data.PRETRAIN_MIX.items())


def settings_for(small: bool) -> ZooSettings:
    """The full zoo (the demo's merge problem) or the small one (tests: fast, weaker)."""
    if small:
        return ZooSettings(
            shape=ModelShape(hidden=32, layers=2, heads=4, intermediate=128),
            pretrain=TrainConfig(steps=150, lr=3e-3, batch_size=32, warmup=20, weight_decay=0.01),
            finetunes=(
                ("add", TrainConfig(steps=40, lr=3e-3, batch_size=32, seed=1)),
                ("facts", TrainConfig(steps=60, lr=3e-3, batch_size=32, seed=2)),
                ("reverse", TrainConfig(steps=400, lr=3e-3, batch_size=32, seed=3)),
            ),
            replay=0.25,
        )
    ft = {"answer_only": True, "freeze_embeddings": True, "warmup": 20}
    return ZooSettings(
        shape=ModelShape(),
        pretrain=TrainConfig(steps=1000, lr=3e-3, warmup=50, weight_decay=0.01),
        finetunes=(
            ("add", TrainConfig(steps=500, lr=2e-3, seed=1, **ft)),
            ("facts", TrainConfig(steps=300, lr=2e-3, seed=2, **ft)),
            ("reverse", TrainConfig(steps=200, lr=1e-3, seed=3, **ft)),
        ),
        replay=0.25,
    )


@dataclass(frozen=True)
class ZooInfo:
    """Where a built zoo lives. `sources` maps skill name to checkpoint dir, in SKILLS order."""

    root: Path
    base: Path
    sources: dict[str, Path]
    study: Path
    evals: Path
    build_hash: str
    rebuilt: bool  # False when an existing zoo was reused
    seconds: dict[str, float] = field(default_factory=dict)


def build_hash(settings: ZooSettings) -> str:
    """Hash of the settings, the zoo's training code and the library versions."""
    import transformers

    h = hashlib.sha256()
    h.update(json.dumps(asdict(settings), sort_keys=True).encode())
    for mod in ("data", "train", "tokenizer", "build"):
        h.update((Path(__file__).parent / f"{mod}.py").read_bytes())
    h.update(f"torch={torch.__version__};transformers={transformers.__version__}".encode())
    return h.hexdigest()[:16]


def _mixed(skill: str, replay: float, mix: dict[str, float]):
    """Example function: the skill, with a `replay` share of pre-training text (less forgetting)."""

    def example(rng):
        if rng.random() < replay:
            prompt, answer = data.pretrain_example(rng, mix)
            return prompt, answer
        return data.skill_example(skill, rng)

    return example


def _save(model: torch.nn.Module, out: Path) -> None:
    """Write a safetensors checkpoint + tokenizer into `out` atomically (temp dir, then rename)."""
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    save_tokenizer(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(f"zoo: {msg}", file=sys.stderr, flush=True)


def _read_marker(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / MARKER).read_text())
    except (OSError, ValueError):
        return None


def build_zoo(
    out_dir: Path, small: bool = False, progress: bool = True, force: bool = False
) -> ZooInfo:
    """Build (or reuse) the zoo in `out_dir` and write `out_dir/study.yaml`; see module doc."""
    out_dir = Path(out_dir).expanduser().resolve()
    if out_dir.exists() and not out_dir.is_dir():
        raise MissingPathError(f"zoo output {out_dir} is a file; pass a directory to --out")
    settings = settings_for(small)
    digest = build_hash(settings)
    skills = [name for name, _ in settings.finetunes]
    paths = {"base": out_dir / "base", **{s: out_dir / s for s in skills}}
    marker = _read_marker(out_dir)
    reuse = (
        not force
        and marker is not None
        and marker.get("build_hash") == digest
        and all((p / "model.safetensors").is_file() for p in paths.values())
    )
    seconds: dict[str, float] = dict(marker.get("seconds", {})) if reuse and marker else {}
    if reuse:
        _log(progress, f"reusing the zoo in {out_dir} (build {digest})")
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / MARKER).unlink(missing_ok=True)
        seconds = _train_all(settings, paths, progress)
        record = {
            "build_hash": digest,
            "small": small,
            "settings": asdict(settings),
            "torch": torch.__version__,
            "seconds": seconds,
            "models": {k: str(v) for k, v in paths.items()},
        }
        (out_dir / MARKER).write_text(json.dumps(record, indent=2) + "\n")
    evals = tasks.resolve_evals_dir(out_dir / "evals")
    study = write_study_yaml(out_dir, evals, small)
    return ZooInfo(
        root=out_dir,
        base=paths["base"],
        sources={s: paths[s] for s in skills},
        study=study,
        evals=evals,
        build_hash=digest,
        rebuilt=not reuse,
        seconds=seconds,
    )


def _train_all(settings: ZooSettings, paths: dict[str, Path], progress: bool) -> dict[str, float]:
    seconds: dict[str, float] = {}
    mix = dict(settings.mix)
    with deterministic():
        t0 = time.perf_counter()
        _log(progress, f"pre-training the base ({settings.pretrain.steps} steps)")
        model = new_model(settings.shape, settings.pretrain.seed)
        train(model, lambda rng: data.pretrain_example(rng, mix), settings.pretrain)
        _save(model, paths["base"])
        base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        seconds["base"] = round(time.perf_counter() - t0, 2)
        for skill, cfg in settings.finetunes:
            t0 = time.perf_counter()
            _log(progress, f"fine-tuning {skill} ({cfg.steps} steps)")
            model.load_state_dict(base_state)
            train(model, _mixed(skill, settings.replay, mix), cfg)
            _save(model, paths[skill])
            seconds[skill] = round(time.perf_counter() - t0, 2)
    seconds["total"] = round(sum(seconds.values()), 2)
    _log(progress, f"built in {seconds['total']:.0f} s")
    return seconds


#: The demo's item budget: what 240 full-fidelity candidates scored on the 48-item search split
#: (3 tasks x 48), the budget the default search was chosen at.
DEMO_ITEMS = 240 * 3 * 48


def write_study_yaml(zoo_dir: Path, evals_dir: Path, small: bool) -> Path:
    """Write `zoo_dir/study.yaml`: a ready study over the zoo and its tasks, absolute paths."""
    import yaml

    zoo_dir, evals_dir = Path(zoo_dir).resolve(), Path(evals_dir).resolve()
    study = {
        "name": "zoo-demo",
        "models": {
            "base": str(zoo_dir / "base"),
            "sources": [{"name": s, "path": str(zoo_dir / s)} for s in data.SKILLS],
        },
        # Task arithmetic, a weight per model per pair of layers (and for the embeddings/norm/head
        # group), raced by halving: chosen on held-out means over seeds 0-2 at the item budget of
        # 240 full-fidelity candidates on the 48-item split (README, "The default search").
        "search_space": {"preset": "task_arithmetic", "granularity": 1 if small else 2},
        "tasks": {
            "include_path": [str(evals_dir)],
            "search": tasks.task_names("search"),
            "heldout": tasks.task_names("heldout"),
            "limit": None,
            "num_fewshot": 0,
            "batch_size": 32,
        },
        "optimizer": {"name": "cma", "popsize": 8, "sigma0": 0.15},
        **({} if small else {"fitness": {"fidelity": "racing", "cohort_rule": "halving"}}),
        "budget": {"max_trials": 16} if small else {"max_trials": 1000, "max_items": DEMO_ITEMS},
        "executor": {"kind": "local", "workers": 1},
        "device": "auto",
        "dtype": "float32",
        "seed": 0,
    }
    path = zoo_dir / STUDY
    path.write_text(yaml.safe_dump(study, sort_keys=False, default_flow_style=None))
    return path
