"""Real users' mergekit configs, unchanged, through `mergekit-yaml` and `evomerge merge`.

tests/data/mergekit_configs/*.yaml are configs in the styles model cards publish, rewritten to
tiny local models (see its README). Every one runs through the real mergekit 0.1.5 (all in one
subprocess, once per module, to pay its import once) and through `evomerge merge`; each header
says what must happen: the same tensors, a documented refusal in one line, warnings naming what
mergekit ignores, or (random methods) a distance check, since mergekit's own output changes with
its seed.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evomerge.cli import main
from tests.model_factory import save_tiny_llama

pytestmark = [
    pytest.mark.mergekit,
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("mergekit") is None, reason="mergekit extra not installed"
    ),
]

CONFIGS = Path(__file__).parent / "data" / "mergekit_configs"
FILES = sorted(CONFIGS.glob("*.yaml"))
TOLERANCE = 1e-5  # max relative error, float32

# One subprocess runs every config (and the random ones again with another seed); it records
# for each whether mergekit ran it and, if not, its error.
DRIVER = """
import json, sys
from mergekit.scripts.run_yaml import main
result = {}
for spec in json.loads(sys.argv[1]):
    try:
        main([spec["config"], spec["out"], "--no-copy-tokenizer", "--no-write-model-card",
              "--quiet", "--random-seed", str(spec["seed"])], standalone_mode=False)
        result[spec["out"]] = None
    except Exception as exc:
        result[spec["out"]] = f"{type(exc).__name__}: {exc}"
print(json.dumps(result))
"""


@dataclass(frozen=True)
class Expect:
    kind: str = "same"  # same, random, refused
    warns: tuple[str, ...] = ()
    error: str | None = None
    mergekit_fails: bool = False
    tolerance: float = TOLERANCE
    style: str = ""


def expectations(path: Path) -> Expect:
    """The `# key: value` header lines of a config file."""
    kind, warns, error, fails, tol, style = "same", [], None, False, TOLERANCE, ""
    for line in path.read_text().splitlines():
        if not line.startswith("# "):
            break
        key, _, value = line[2:].partition(": ")
        if key == "expect":
            kind = value
        elif key == "warn":
            warns.append(value)
        elif key == "error":
            error = value
        elif key == "mergekit":
            fails = value == "fails"
        elif key == "tolerance":
            tol = float(value)
        elif key == "style":
            style = value
    assert kind in ("same", "random", "refused"), f"{path.name}: expect {kind!r}"
    assert (kind == "refused") == (error is not None), f"{path.name}: refused needs an error line"
    return Expect(kind, tuple(warns), error, fails, tol, style)


def save_tokenizer(out: Path, *, shuffle_seed: int | None = None, size: int = 64) -> None:
    """A word-level tokenizer with one token per embedding row; `shuffle_seed` orders the same
    tokens differently (another vocabulary of the same size)."""
    import random

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(3, size)]
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(words)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(out)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> tuple[Path, dict[str, str | None]]:
    """The tiny models and every config's mergekit-yaml output under `root/mk/`."""
    root = tmp_path_factory.mktemp("mkcfg")
    base = save_tiny_llama(root / "base", seed=10)
    for i, name in enumerate(("math", "code", "chat", "other")):
        save_tiny_llama(root / name, seed=11 + i, base=base, noise=0.05)
    for name in ("base", "math", "code", "chat"):
        save_tokenizer(root / name)
    save_tokenizer(root / "other", shuffle_seed=3)
    specs = []
    for path in FILES:
        shutil.copy(path, root / path.name)  # model paths are relative to the config's folder
        specs.append({"config": path.name, "out": f"mk/{path.stem}", "seed": 0})
        if expectations(path).kind == "random":
            specs.append({"config": path.name, "out": f"mk/{path.stem}-seed1", "seed": 1})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps(specs)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return root, json.loads(proc.stdout.strip().splitlines()[-1])


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def max_rel_error(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> float:
    """Largest per-tensor max |a - b| / max |b| over all tensors (names, shapes, dtypes equal)."""
    assert ours.keys() == theirs.keys()
    worst = 0.0
    for name, ref in theirs.items():
        got = ours[name]
        assert got.shape == ref.shape and got.dtype == ref.dtype, name
        diff = (got.double() - ref.double()).abs().max()
        worst = max(worst, (diff / ref.double().abs().max().clamp_min(1e-12)).item())
    return worst


def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return sum(((a[k].double() - b[k].double()) ** 2).sum().item() for k in b) ** 0.5


def evomerge_merge(name: str, out: Path, caplog) -> tuple[int, list[str]]:
    """`evomerge merge` in process (cwd: the configs' folder): exit code and warning lines."""
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="evomerge.mergekit"):
        rc = main(["merge", name, "--out", str(out), "--quiet"])
    return rc, [r.getMessage() for r in caplog.records if r.name == "evomerge.mergekit"]


def test_the_collection_covers_every_method_and_style():
    """At least 30 configs; every method evomerge has appears in one."""
    from evomerge.methods import METHODS

    assert len(FILES) >= 30
    used = {
        line.split(":", 1)[1].strip()
        for f in FILES
        for line in f.read_text().splitlines()
        if line.startswith("merge_method:")
    }
    assert set(METHODS.names()) <= used, sorted(set(METHODS.names()) - used)
    kinds = {expectations(f).kind for f in FILES}
    assert kinds == {"same", "random", "refused"}


@pytest.mark.parametrize("path", FILES, ids=[f.stem for f in FILES])
def test_config_behaves_as_in_mergekit(zoo, path, tmp_path, caplog, capsys, monkeypatch):
    root, mergekit = zoo
    monkeypatch.chdir(root)  # as mergekit-yaml ran: model paths relative to the working directory
    expect = expectations(path)
    mk_error = mergekit[f"mk/{path.stem}"]
    out = tmp_path / "ev"
    rc, warnings = evomerge_merge(path.name, out, caplog)
    err = capsys.readouterr().err
    for want in expect.warns:
        assert any(want in w for w in warnings), f"no warning with {want!r} in {warnings}"
    assert all("\n" not in w for w in warnings)
    if expect.kind == "refused":
        assert rc == 2, err
        (line,) = err.strip().splitlines()
        assert line.startswith("evomerge: error: ") and expect.error in line, line
        assert "sections[" not in line  # names what the user wrote, not our sections
        assert (mk_error is not None) == expect.mergekit_fails, mk_error
        return
    assert mk_error is None, f"mergekit refused {path.name}: {mk_error}"
    assert rc == 0, err
    ours, theirs = load_dir(out), load_dir(root / "mk" / path.stem)
    if expect.kind == "same":
        worst = max_rel_error(ours, theirs)
        assert worst <= expect.tolerance, f"{path.name}: max relative error {worst:.2e}"
        assert len(warnings) == len(expect.warns), warnings
        return
    # random: mergekit's masks come from torch's global generator (its output changes with its
    # seed); ours are seeded per tensor from the recipe. Same distribution: ours is about as far
    # from mergekit's as mergekit's two seeds are from each other, and repeats exactly.
    other = load_dir(root / "mk" / f"{path.stem}-seed1")
    max_rel_error(ours, theirs)  # same names, shapes and dtypes
    spread = distance(other, theirs)
    assert spread > 0, "mergekit's output did not change with its seed"
    ratio = distance(ours, theirs) / spread
    assert 0.7 < ratio < 1.4, f"{path.name}: distance ratio {ratio:.2f}"
    again = tmp_path / "ev2"
    assert evomerge_merge(path.name, again, caplog)[0] == 0
    assert max_rel_error(load_dir(again), ours) == 0.0


def test_cli_prints_one_line_per_warning_and_error(zoo, tmp_path):
    """The real command: warnings and the error each on one line of stderr."""
    root, _ = zoo
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "evomerge.cli", "merge"]
    proc = subprocess.run(
        [*cmd, "12-ties-typos.yaml", "--out", str(tmp_path / "a"), "--quiet"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines == [
        "evomerge: warning: 12-ties-typos.yaml: 'int8_mask' is not a mergekit key; mergekit "
        "ignores it; did you mean parameters.int8_mask?",
        "evomerge: warning: 12-ties-typos.yaml: 'dype' is not a mergekit key; mergekit ignores "
        "it; did you mean 'dtype'?",
    ]
    proc = subprocess.run(
        [*cmd, "38-slerp-three-models.yaml", "--out", str(tmp_path / "b")],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith(
        "evomerge: error: 38-slerp-three-models.yaml: models: method 'slerp' takes exactly 2 "
        "models, got 3"
    )
    assert len(proc.stderr.strip().splitlines()) == 1
