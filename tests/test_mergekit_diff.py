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
        **new_method_configs(m),
    }


def new_method_configs(m: dict[str, str]) -> dict[str, dict]:
    """The methods added for mergekit parity (issue 16), with gradients and filters wherever
    the method takes a per-tensor parameter. Task vectors are noise of std 0.05, so the epsilons
    of ram near 0.06 leave a mix of entries changed by one model and by several."""
    base, a, b, c = m["base"], m["a"], m["b"], m["c"]
    f32 = {"dtype": "float32"}
    return {
        "nuslerp": {  # no base: the models themselves, one angle per row
            "merge_method": "nuslerp",
            "models": [
                {"model": a, "parameters": {"weight": [1.0, 0.2]}},
                {
                    "model": b,
                    "parameters": {"weight": [{"filter": "mlp", "value": 0.7}, {"value": 0.4}]},
                },
            ],
            "parameters": {"nuslerp_flatten": False},
            **f32,
        },
        "nuslerp_base": {  # the task vectors, flattened; the base listed among the models too
            "merge_method": "nuslerp",
            "base_model": base,
            "models": [
                {"model": base},
                {"model": a, "parameters": {"weight": 0.3}},
                {"model": b, "parameters": {"weight": [0.1, 0.9]}},
            ],
            **f32,
        },
        "nuslerp_row_wise": {
            "merge_method": "nuslerp",
            "base_model": base,
            "models": [
                {"model": a, "parameters": {"weight": 0.6}},
                {"model": b, "parameters": {"weight": 0.5}},
            ],
            "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
            **f32,
        },
        "multislerp": {  # any number of models, no base
            "merge_method": "multislerp",
            "models": [
                {"model": a, "parameters": {"weight": [0.2, 1.0]}},
                {"model": b, "parameters": {"weight": 0.5}},
                {
                    "model": c,
                    "parameters": {
                        "weight": [{"filter": "self_attn", "value": 0.1}, {"value": 0.8}]
                    },
                },
            ],
            **f32,
        },
        "multislerp_base": {
            "merge_method": "multislerp",
            "base_model": base,
            "models": [
                {"model": a, "parameters": {"weight": 0.7}},
                {"model": b, "parameters": {"weight": [0.1, 0.6]}},
                {"model": c, "parameters": {"weight": -0.2}},
            ],
            "parameters": {"normalize_weights": False},
            **f32,
        },
        "karcher": {
            "merge_method": "karcher",
            "models": [{"model": a}, {"model": b}, {"model": c}],
            "parameters": {"max_iter": [{"filter": "mlp", "value": 2}, {"value": 20}], "tol": 1e-7},
            **f32,
        },
        "karcher_base": {  # mergekit averages base_model in too: listed here
            "merge_method": "karcher",
            "base_model": base,
            "models": [{"model": base}, {"model": a}, {"model": b}],
            **f32,
        },
        "karcher_base_unlisted": {  # ... and added as one more model when not listed
            "merge_method": "karcher",
            "base_model": base,
            "models": [{"model": a}, {"model": c}],
            **f32,
        },
        "sce": {
            "merge_method": "sce",
            "base_model": base,
            "models": [{"model": a}, {"model": b}, {"model": c}],
            "parameters": {
                "select_topk": [{"filter": "self_attn", "value": [0.2, 0.9]}, {"value": 0.5}],
            },
            **f32,
        },
        "sce_all": {  # select_topk 1: no selection; int8_mask accepted; the base listed
            "merge_method": "sce",
            "base_model": base,
            "models": [{"model": base}, {"model": a}, {"model": b}],
            "parameters": {"int8_mask": True},
            **f32,
        },
        "nearswap": {
            "merge_method": "nearswap",
            "base_model": base,
            "models": [{"model": a}],
            "parameters": {"t": [{"filter": "self_attn", "value": [0.001, 0.06]}, {"value": 0.02}]},
            **f32,
        },
        "arcee_fusion": {
            "merge_method": "arcee_fusion",
            "base_model": base,
            "models": [{"model": base}, {"model": b}],
            **f32,
        },
        "ram": {
            "merge_method": "ram",
            "base_model": base,
            "models": [{"model": a}, {"model": b}, {"model": c}],
            "parameters": {"epsilon": [{"filter": "mlp", "value": [0.03, 0.09]}, {"value": 0.06}]},
            **f32,
        },
        "ramplus_tl": {
            "merge_method": "ramplus_tl",
            "base_model": base,
            "models": [{"model": a}, {"model": b}, {"model": c}],
            "parameters": {
                "epsilon": 0.06,
                "r": [0.1, 0.9],
                "alpha": [{"filter": "self_attn", "value": 0.3}, {"value": 1.0}],
            },
            **f32,
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


CONFIG_NAMES = list(configs(dict.fromkeys(["base", "a", "b", "c"], "")))


@pytest.mark.parametrize("method", CONFIG_NAMES)
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
