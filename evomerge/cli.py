"""Command-line entry point. Maps library exceptions to exit codes; nothing else does.

Each subcommand lives in `evomerge/commands/<name>.py` with `add_arguments(parser)` and
`run(args) -> int`. Modules are imported only when their command runs, so `evomerge --help`
imports neither torch nor ray nor lm_eval.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
from typing import Any

from evomerge import __version__
from evomerge.errors import (
    EXIT_CLUSTER_LOST,
    EXIT_DISK_FULL,
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    EXIT_USER_ERROR,
    ClusterLostError,
    DiskFullError,
    Terminated,
    UserError,
)

# name -> (module, one-line help). Order is the order shown in --help.
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("evomerge.commands.run", "start a study from a study YAML"),
    "resume": ("evomerge.commands.resume", "continue an interrupted study"),
    "status": ("evomerge.commands.status", "progress and best recipe of a run"),
    "export": (
        "evomerge.commands.export",
        "write the winning checkpoint, recipes, model card and report",
    ),
    "report": ("evomerge.commands.report", "plots and summary table of a run, without exporting"),
    "merge": ("evomerge.commands.merge", "one merge from our recipe YAML or a mergekit YAML"),
    "convert": ("evomerge.commands.convert", "a mergekit-evolve config as a study.yaml"),
    "fetch": ("evomerge.commands.fetch", "download and check a study's models and datasets"),
    "eval": ("evomerge.commands.eval", "score a checkpoint with lm-eval"),
    "zoo": ("evomerge.commands.zoo", "build the demo model zoo and its study.yaml"),
    "demo": (
        "evomerge.commands.demo",
        "build the zoo, run the demo study, export, print held-out table",
    ),
    "bench": ("evomerge.commands.bench", "merge, scoring and worker throughput on this hardware"),
}


def _available_commands() -> dict[str, tuple[str, str]]:
    """Commands whose module exists in this install (so a partial checkout still runs)."""
    import importlib.util

    return {k: v for k, v in COMMANDS.items() if importlib.util.find_spec(v[0]) is not None}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evomerge",
        description="Evolutionary search for model-merge recipes (per-layer coefficients and methods).",
    )
    parser.add_argument("--version", action="version", version=f"evomerge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in _available_commands().items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module_name)
        # Arguments are declared by the module; importing it must stay light (no torch).
        importlib.import_module(module_name).add_arguments(p)
    return parser


def _set_env_defaults() -> None:
    """Quiet defaults for third-party libraries, each kept when the user set it. The user's
    Hugging Face settings (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE, HF_HOME, ...) are left as they
    are: hub ids and lm-eval's built-in tasks download as huggingface_hub and datasets define."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Third-party tqdm bars (weights loading, dataset splits, lm-eval requests) would bury our
    # own progress display; evomerge shows progress with rich.
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main(argv: list[str] | None = None) -> int:
    _set_env_defaults()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    from evomerge.memory import keep_freed_memory

    keep_freed_memory()
    with _SigtermRaises() as sigterm:
        try:
            module = importlib.import_module(args._module)
            code = int(module.run(args) or 0)
            # a command that reported Ctrl-C's code for what was SIGTERM (see _SigtermRaises)
            return EXIT_TERMINATED if code == EXIT_INTERRUPTED and sigterm.fired else code
        except UserError as exc:
            print(f"evomerge: error: {exc}", file=sys.stderr)
            return EXIT_USER_ERROR
        except DiskFullError as exc:
            hint = "" if exc.hinted else f"; {_DISK_FULL_HINT}"
            print(f"evomerge: error: {exc}{hint}", file=sys.stderr)
            return EXIT_DISK_FULL
        except ClusterLostError as exc:
            print(f"evomerge: error: {exc}", file=sys.stderr)
            return EXIT_CLUSTER_LOST
        except KeyboardInterrupt as exc:
            if isinstance(exc, Terminated) or sigterm.fired:
                print("evomerge: terminated (SIGTERM)", file=sys.stderr)
                return EXIT_TERMINATED
            print("evomerge: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        except BrokenPipeError:  # `evomerge status RUN | head`: the reader left; not an error
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush stays quiet
            return 0
        except Exception as exc:
            full = _disk_full_error(exc, args)
            if full is None:
                raise
            print(f"evomerge: error: {full}", file=sys.stderr)
            return EXIT_DISK_FULL


_DISK_FULL_HINT = "free space there and run the command again"


def _disk_full_error(exc: Exception, args: argparse.Namespace) -> Exception | None:
    """A full disk met where no writer said which file (a library's own write): the error
    naming the file when the OSError has one, else the command's output folder or run."""
    from evomerge.disk_full import disk_full_cause, no_space

    cause = disk_full_cause(exc)
    if cause is None:
        return None
    where = getattr(cause, "filename", None) or getattr(args, "out", None)
    where = where or getattr(args, "run_dir", None) or os.getcwd()
    return no_space(where, cause, hint=_DISK_FULL_HINT)


class _SigtermRaises:
    """SIGTERM (a scheduler's preemption) raises `Terminated` in the main thread, so it cleans
    up like Ctrl-C and exits 143. Raised once: a second SIGTERM would cut that cleanup short,
    and the scheduler's SIGKILL follows its grace period anyway. The study loop holds it
    during bookkeeping (`evomerge.study.InterruptGate`). `fired` says whether it came, also
    when a library turned the exception into a plain KeyboardInterrupt (Ray's ray.wait does)."""

    def __init__(self) -> None:
        self.fired = False
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> _SigtermRaises:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            previous = self._previous if self._previous is not None else signal.SIG_DFL
            signal.signal(signal.SIGTERM, previous)

    def _handle(self, signum: int, frame: object) -> None:
        if not self.fired:
            self.fired = True
            raise Terminated


if __name__ == "__main__":
    sys.exit(main())
