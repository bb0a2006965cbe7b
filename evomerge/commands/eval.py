"""`evomerge eval MODEL_DIR [MODEL_DIR ...] --tasks T1,T2`: score checkpoints with the scorer a
study uses. Several folders print one comparison table (model x task primary metric, and the
mean), e.g. the demo zoo's parent x skill table; `--json` prints one JSON object per model.

Importing this module stays light (no torch, no lm_eval): `evomerge --help` imports it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from evomerge.dtypes import CHOICES

_DTYPES = ("auto", *CHOICES)


def _split(values: list[str] | None) -> tuple[str, ...]:
    """['a,b', 'c'] -> ('a', 'b', 'c'): repeated flags and comma lists both work."""
    return tuple(x.strip() for v in values or [] for x in v.split(",") if x.strip())


def _limit(text: str) -> int | float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    return int(value) if value.is_integer() else value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model_dirs",
        nargs="+",
        metavar="MODEL_DIR",
        help="checkpoint folder (safetensors); several print one comparison table",
    )
    parser.add_argument(
        "--tasks",
        action="append",
        required=True,
        metavar="T1,T2",
        help="lm-eval task, group or tag names, or task YAML paths (comma-separated or repeated)",
    )
    parser.add_argument(
        "--include-path",
        action="append",
        default=[],
        metavar="P",
        help="folder of task YAMLs to search first (comma-separated or repeated)",
    )
    parser.add_argument(
        "--limit", type=_limit, help="first N docs per task (a number < 1: that fraction)"
    )
    parser.add_argument(
        "--num-fewshot", type=int, help="few-shot examples (default: each task's own)"
    )
    parser.add_argument("--batch-size", type=int, default=16, help="requests per forward pass")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    parser.add_argument("--dtype", choices=_DTYPES, default="auto", help="weights dtype")
    parser.add_argument(
        "--apply-chat-template",
        action="store_true",
        help="format prompts (and few-shot turns) with the tokenizer's chat template",
    )
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="accept .bin/.pt weights (unpickling can run code: only for trusted files)",
    )
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run model code shipped with the checkpoint",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--verbose", action="store_true", help="show lm-eval's log and progress")


def _check_weights(path: Path, allow_pickle: bool) -> bool:
    """True when the folder holds safetensors; refuses pickles unless allowed."""
    from evomerge.checkpoint import PICKLE_NAMES
    from evomerge.errors import MissingPathError, UnsafeCheckpointError

    if any(path.glob("*.safetensors")):
        return True
    pickled = [n for n in PICKLE_NAMES if (path / n).exists()] + [p.name for p in path.glob("*.pt")]
    if not pickled:
        raise MissingPathError(f"MODEL_DIR: {path} holds no *.safetensors weights")
    if not allow_pickle:
        raise UnsafeCheckpointError(
            f"MODEL_DIR: {path} holds only pickled weights ({pickled[0]}); unpickling can run "
            "code. Convert it to safetensors, or pass --allow-pickle if you trust it"
        )
    return False


def _load(path: Path, args: argparse.Namespace) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.errors import ConfigError

    safetensors = _check_weights(path, args.allow_pickle)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ConfigError(
            f"--device: unknown device {args.device!r} (use cpu, cuda, cuda:N)"
        ) from None
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, use_safetensors=safetensors, trust_remote_code=args.trust_remote_code
    )
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=args.trust_remote_code)
    return model.to(device).eval(), tokenizer


def _print_table(model_dir: str, result: Any, primary: dict[str, tuple[str, bool]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"evomerge eval {model_dir}")
    table.add_column("task")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("n", justify="right")
    for task, metrics in result.metrics.items():
        main = primary.get(task, ("", True))
        for metric, value in metrics.items():
            mark = (" ↑" if main[1] else " ↓") if metric == main[0] else ""
            n = result.samples.get(task)
            table.add_row(task, metric + mark, f"{value:.4f}", "" if n is None else str(n))
    console = Console()
    console.print(table)
    console.print(
        f"{result.seconds:.2f} s scoring ({result.forward_seconds:.2f} s in forward passes); "
        "↑/↓ marks each task's primary metric and its direction"
    )


def _print_comparison(rows: list[tuple[str, Any]], primary: dict[str, tuple[str, bool]]) -> None:
    """One row per model: each task's primary metric and their mean; the best mean is named."""
    from rich.console import Console
    from rich.table import Table

    tasks = list(primary)
    table = Table(title="evomerge eval: primary metric per task")
    table.add_column("model", no_wrap=True)
    for task in tasks:
        metric, up = primary[task]
        table.add_column(f"{task}\n{metric} {'↑' if up else '↓'}", justify="right", no_wrap=True)
    table.add_column("mean", justify="right")
    values = {
        name: [result.metrics.get(t, {}).get(primary[t][0], float("nan")) for t in tasks]
        for name, result in rows
    }
    means = {name: sum(v) / len(v) for name, v in values.items()}
    for name, _ in rows:
        table.add_row(name, *(f"{v:.4f}" for v in values[name]), f"{means[name]:.4f}")
    widths = [max(len(n) for n, _ in rows), *(max(len(t), 6) for t in tasks), 6]
    console = Console(width=max(80, sum(w + 3 for w in widths) + 1))  # never truncate a cell
    console.print(table)
    best = max(means, key=lambda n: means[n])
    console.print(f"best mean: {best} ({means[best]:.4f}); the mean is over the tasks above")


def _names(paths: list[Path]) -> list[str]:
    """Short distinct labels: folder names, or the full paths where two names collide."""
    names = [p.name for p in paths]
    return names if len(set(names)) == len(names) else [str(p) for p in paths]


def run(args: argparse.Namespace) -> int:
    if not args.verbose:
        os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported by anything below
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
    from evomerge.checkpoint import CheckpointReader, resolve_model_path
    from evomerge.errors import CandidateError
    from evomerge.scoring import Scorer, ScoringSettings, check_tasks

    config = ScoringSettings(
        tasks=_split(args.tasks),
        include_paths=_split(args.include_path),
        limit=args.limit,
        num_fewshot=args.num_fewshot,
        batch_size=args.batch_size,
        apply_chat_template=args.apply_chat_template,
    )
    paths = [resolve_model_path(d, where="MODEL_DIR") for d in args.model_dirs]
    for path in paths:  # every folder is checked before the first model loads
        if _check_weights(path, args.allow_pickle):
            # headers against file sizes, config.json against the weights (pickles load whole:
            # from_pretrained reads them once, below)
            CheckpointReader(path, where="MODEL_DIR").close()
    check_tasks(config)  # unknown tasks fail here, before the model loads
    rows: list[tuple[str, Any]] = []
    primary: dict[str, tuple[str, bool]] = {}
    for name, path, given in zip(_names(paths), paths, args.model_dirs, strict=True):
        model, tokenizer = _load(path, args)
        scorer = Scorer(model, tokenizer, config, fitness=False)
        try:
            result = scorer.score()
        except CandidateError as exc:
            print(f"evomerge: error: {given} could not be scored: {exc}", file=sys.stderr)
            return 1
        primary = scorer.primary_metrics()
        del model, scorer
        rows.append((name, result))
        if args.json:
            out = {
                "model": str(path),
                "tasks": result.metrics,
                "primary": {
                    t: {"metric": m, "higher_is_better": h} for t, (m, h) in primary.items()
                },
                "samples": result.samples,
                "seconds": result.seconds,
                "forward_seconds": result.forward_seconds,
            }
            print(json.dumps(out, sort_keys=True), flush=True)
        elif len(paths) == 1:
            _print_table(given, result, primary)
    if len(paths) > 1 and not args.json:
        _print_comparison(rows, primary)
    return 0
