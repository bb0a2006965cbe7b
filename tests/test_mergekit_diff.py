"""Differential tests: the same mergekit YAML through `mergekit-yaml` and `evomerge merge`.

mergekit is an optional extra (installed in CI). All configs run through mergekit-yaml's own
command function in one subprocess, to pay its import time once.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from evomerge.cli import main
from tests.model_factory import save_tiny_llama

pytestmark = [
    pytest.mark.mergekit,
    pytest.mark.skipif(
        importlib.util.find_spec("mergekit") is None, reason="mergekit extra not installed"
    ),
]


def configs(m: dict[str, str]) -> dict[str, dict]:
    base, a, b, c = m["base"], m["a"], m["b"], m["c"]
    return {
        "linear": {
            "merge_method": "linear",
            "models": [
                {"model": a, "parameters": {"weight": [1.0, 0.2]}},
                {"model": b, "parameters": {"weight": 0.5}},
                {
                    "model": c,
                    "parameters": {
                        "weight": [{"filter": "self_attn", "value": 0.1}, {"value": 0.7}]
                    },
                },
            ],
            "dtype": "float32",
        },
        "task_arithmetic": {
            "merge_method": "task_arithmetic",
            "base_model": base,
            "models": [
                {"model": a, "parameters": {"weight": 0.7}},
                {"model": b, "parameters": {"weight": [0.1, 0.9]}},
            ],
            "parameters": {"lambda": 0.8},
            "dtype": "float32",
        },
        "ties": {
            "merge_method": "ties",
            "base_model": base,
            "models": [
                {"model": a, "parameters": {"weight": 0.6, "density": 0.4}},
                {"model": b, "parameters": {"weight": 0.4, "density": [0.2, 0.9]}},
                {"model": c, "parameters": {"weight": 0.5, "density": 0.7}},
            ],
            "parameters": {"normalize": True},
            "dtype": "float32",
        },
        "slerp": {
            "merge_method": "slerp",
            "base_model": a,
            "models": [{"model": a}, {"model": b}],
            "parameters": {
                "t": [
                    {"filter": "self_attn", "value": [0.0, 0.5, 0.3, 0.7, 1.0]},
                    {"filter": "mlp", "value": [1.0, 0.3]},
                    {"value": 0.5},
                ]
            },
            "dtype": "float32",
        },
        "breadcrumbs": {
            "merge_method": "breadcrumbs",
            "base_model": base,
            "models": [
                {"model": a, "parameters": {"weight": 0.5, "density": 0.8, "gamma": 0.05}},
                {"model": b, "parameters": {"weight": 0.5, "density": 0.6, "gamma": 0.1}},
            ],
            "dtype": "float32",
        },
        "model_stock": {
            "merge_method": "model_stock",
            "base_model": base,
            "models": [{"model": a}, {"model": b}, {"model": c}],
            "dtype": "float32",
        },
        "passthrough": {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": a, "layer_range": [0, 3]}]},
                {"sources": [{"model": b, "layer_range": [1, 4]}]},
            ],
            "dtype": "float32",
        },
    }


DRIVER = """
import sys
from mergekit.scripts.run_yaml import main
for cfg, out in zip(sys.argv[1::2], sys.argv[2::2]):
    main([cfg, out, "--no-copy-tokenizer", "--quiet"], standalone_mode=False)
"""


@pytest.fixture(scope="module")
def both(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("mk")
    base = save_tiny_llama(root / "base", seed=10)
    models = {"base": str(base)}
    for i, name in enumerate("abc"):
        models[name] = str(save_tiny_llama(root / name, seed=11 + i, base=base, noise=0.05))
    argv = []
    for name, cfg in configs(models).items():
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        argv += [str(path), str(root / f"mk-{name}")]
    subprocess.run([sys.executable, "-c", DRIVER, *argv], check=True, capture_output=True)
    return root, models


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize(
    "method",
    ["linear", "task_arithmetic", "ties", "slerp", "breadcrumbs", "model_stock", "passthrough"],
)
def test_same_tensors_as_mergekit_yaml(both, method):
    root, _ = both
    out = root / f"ev-{method}"
    assert main(["merge", str(root / f"{method}.yaml"), "--out", str(out), "--quiet"]) == 0
    ours, theirs = load_dir(out), load_dir(root / f"mk-{method}")
    assert ours.keys() == theirs.keys()
    worst = 0.0
    for name, ref in theirs.items():
        got = ours[name]
        assert got.shape == ref.shape and got.dtype == ref.dtype, name
        rel = (
            (got.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-12)
        ).item()
        worst = max(worst, rel)
    assert worst <= 1e-5, f"{method}: max relative error {worst:.2e}"
