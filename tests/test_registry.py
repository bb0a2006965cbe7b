"""The one registry mechanism: lazy "module:attr" entries, entry points, duplicates, did you mean."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from evomerge.errors import ConfigError
from evomerge.registry import Registry, did_you_mean


class Base:
    pass


class Child(Base):
    pass


def test_lazy_entry_imports_only_when_asked(tmp_path, monkeypatch) -> None:
    (tmp_path / "lazy_plugin_mod.py").write_text("IMPORTED = True\nclass Thing:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reg: Registry[type] = Registry("thing")
    reg.register("thing", "lazy_plugin_mod:Thing")
    assert "lazy_plugin_mod" not in sys.modules
    assert reg.names() == ["thing"] and "thing" in reg
    assert "lazy_plugin_mod" not in sys.modules  # listing imports nothing
    cls = reg.get("thing")
    assert cls.__name__ == "Thing" and sys.modules["lazy_plugin_mod"].IMPORTED
    assert reg.get("thing") is cls  # resolved once


def test_duplicates_raise_and_types_are_checked() -> None:
    reg: Registry[type[Base]] = Registry("widget", Base, classes=True)
    reg.register("child", Child)
    with pytest.raises(ValueError, match="'child' is already registered"):
        reg.register("child", Child)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("child", "tests.test_registry:Child")  # lazy or not, one name once
    with pytest.raises(TypeError, match="must be a Base subclass"):
        reg.register("int", int)
    reg.register("lazy_int", "builtins:int")  # a lazy entry is checked when it resolves
    with pytest.raises(TypeError, match="must be a Base subclass"):
        reg.get("lazy_int")
    instances: Registry[Base] = Registry("object", Base)
    with pytest.raises(TypeError, match="must be a Base instance"):
        instances.register("cls", Child)


def test_unknown_names_get_did_you_mean_and_the_list() -> None:
    reg: Registry[int] = Registry("number")
    reg.register("seven", 7)
    reg.register("eleven", 11)
    with pytest.raises(ConfigError) as err:
        reg.get("sevne", where="config.number")
    assert str(err.value) == (
        "unknown number 'sevne' in config.number; did you mean 'seven'? (available: eleven, seven)"
    )
    assert did_you_mean("zzz", ["seven"]) == ""
    assert (
        did_you_mean("ties", ["ties_dare", "tie", "x"], n=2) == "; did you mean 'tie', 'ties_dare'?"
    )


def test_a_lazy_entry_that_does_not_load_is_a_clear_error() -> None:
    reg: Registry[object] = Registry("plugin")
    reg.register("gone", "no_such_module_anywhere:Thing")
    with pytest.raises(
        ConfigError, match=r"plugin 'gone': cannot load 'no_such_module_anywhere:Thing'"
    ):
        reg.get("gone")


def test_discovery_runs_once_and_lazily() -> None:
    calls = []

    def discover() -> dict[str, int]:
        calls.append(1)
        return {"found": 1}

    reg: Registry[int] = Registry("item", discover=discover)
    reg.register("own", 0)
    assert calls == []
    assert reg.names() == ["found", "own"] and reg.get("found") == 1
    assert calls == [1]


def test_entry_points_of_an_installed_package_register(tmp_path) -> None:
    """A third-party optimizer joins through the `evomerge.optimizers` entry-point group: a real
    distribution on sys.path (dist-info with entry_points.txt), seen by a fresh interpreter."""
    (tmp_path / "my_opt_plugin.py").write_text(
        textwrap.dedent(
            """
            from evomerge.optimizers.cma_es import CMAOptimizer

            class MyOptimizer(CMAOptimizer):
                name = "my_opt"
            """
        )
    )
    dist = tmp_path / "my_opt_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-opt-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[evomerge.optimizers]\nmy_opt = my_opt_plugin:MyOptimizer\n"
    )
    code = (
        "from evomerge.optimizers import OPTIMIZERS; import sys;"
        "print(OPTIMIZERS.names()); print('my_opt_plugin' in sys.modules);"
        "print(OPTIMIZERS.get('my_opt').__name__)"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={"PYTHONPATH": f"{tmp_path}:{root}", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert "my_opt" in out[0] and "'cma'" in out[0]
    assert out[1] == "False"  # listed without importing the plugin
    assert out[2] == "MyOptimizer"
