"""The command line as a whole: light imports, every command present, exit codes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from evomerge.cli import COMMANDS, main

HEAVY = ("torch", "ray", "lm_eval", "transformers", "optuna", "cma")


def test_help_imports_no_heavy_package():
    code = (
        "import sys\n"
        "from evomerge.cli import build_parser\n"
        "build_parser().format_help()\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_every_command_in_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for name in (
        "run",
        "resume",
        "status",
        "export",
        "report",
        "merge",
        "eval",
        "zoo",
        "demo",
        "bench",
    ):
        assert name in COMMANDS and f"    {name}" in text, name


def test_no_command_and_unknown_command_exit_2(capsys):
    assert main([]) == 2
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2


def test_exit_codes_are_distinct_and_leave_1_to_bugs():
    from evomerge import errors

    codes = {k: v for k, v in vars(errors).items() if k.startswith("EXIT_")}
    assert len(set(codes.values())) == len(codes), codes
    assert 1 not in codes.values()
    assert (errors.EXIT_DISK_FULL, errors.EXIT_INTERRUPTED, errors.EXIT_TERMINATED) == (
        75,
        130,
        143,
    )
    assert errors.interrupt_exit_code(errors.Terminated()) == 143
    assert errors.interrupt_exit_code(KeyboardInterrupt()) == 130


def test_main_leaves_the_sigterm_handler_as_it_found_it(tmp_path, capsys):
    """main() catches SIGTERM while a command runs (exit 143), and only then."""
    import signal

    before = signal.getsignal(signal.SIGTERM)
    assert main(["status", str(tmp_path / "missing")]) == 2
    assert signal.getsignal(signal.SIGTERM) is before
