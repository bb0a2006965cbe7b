"""Conformance over the common decoder architectures (tests/arch_factory.py), each a tiny random
base with three fine-tunes in the layout the installed transformers writes:

- merges equal mergekit-yaml's tensors (mergekit 0.1.5, its own command in one subprocess);
- the search's in-place merge into a live model equals the disk merge, read back through
  transformers' own loading (which fuses MoE experts and renames GPT-NeoX's head);
- a 3-trial study runs, and its export loads with AutoModelForCausalLM and generates.

mergekit 0.1.5 reads Mixtral and Qwen3-MoE checkpoints in transformers' saved layout (one tensor
per expert) by converting them to transformers' in-memory layout (one 3-D tensor per layer) and
merges those. evomerge merges the checkpoint tensors that make up one such live tensor as one
task over their stack (evomerge.fusion), so methods with a per-tensor statistic (TIES' top-k and
sign election, slerp's angle, model_stock's ratio, breadcrumbs' cut) see all of a layer's
experts as mergekit does; every tensor, experts included, is compared in the fused layout, for
every core method. Filters still see the checkpoint's names: Mixtral's say `block_sparse_moe`
where mergekit sees transformers' `mlp`, so Mixtral skips slerp's `mlp` filter (Qwen3-MoE's
checkpoint says `mlp` and runs it). The fused layout itself (`mixtral_fused`) is merged exactly
as mergekit merges it.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from evomerge.cli import main
from tests.arch_factory import ARCHS, save_family
from tests.study_factory import write_task
from tests.test_mergekit_diff import configs as all_configs

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

NO_MERGEKIT = importlib.util.find_spec("mergekit") is None
# Methods checked on every architecture: weighted sums with filters and gradients, top-k and
# sign election, angles, the model-stock ratio, sparsification with an outlier cut, a
# frankenmerge; the full set on the layouts that differ most (Conv1D, fused 3-D experts).
CORE = ("linear", "task_arithmetic", "ties", "slerp", "model_stock", "breadcrumbs", "passthrough")
FULL = ("gpt2", "mixtral_fused")
# per-expert checkpoints that mergekit converts to transformers' fused layout before merging
SPLIT_MOE = tuple(a for a, arch in ARCHS.items() if arch.mergekit == "fused")
# mergekit 0.1.5's gpt-neox.json requires the attention buffers `attention.bias`,
# `attention.masked_bias` and `rotary_emb.inv_freq`, which transformers 5 does not save.
NO_MERGEKIT_ARCHS = tuple(a for a, arch in ARCHS.items() if arch.mergekit == "none")
KNOWN_GAPS: dict[tuple[str, str], str] = {}
KNOWN_GAPS.update(
    {(a, "linear"): "mergekit 0.1.5 refuses transformers 5's GPT-NeoX" for a in NO_MERGEKIT_ARCHS}
)


def arch_configs(fam: dict[str, Path]) -> dict[str, dict]:
    m = {"base": str(fam["base"]), "a": str(fam["s1"]), "b": str(fam["s2"]), "c": str(fam["s3"])}
    cfgs = all_configs(m)
    cfgs["passthrough"] = {  # two layers here: the first of a, then the last of b
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": m["a"], "layer_range": [0, 1]}]},
            {"sources": [{"model": m["b"], "layer_range": [1, 2]}]},
        ],
        "dtype": "float32",
    }
    return cfgs


def methods_for(arch: str) -> tuple[str, ...]:
    if arch in NO_MERGEKIT_ARCHS:  # one config, expected to fail: tells when mergekit learns it
        return ("linear",)
    if arch == "mixtral":  # slerp's `mlp` filter: Mixtral's checkpoint says `block_sparse_moe`
        return tuple(m for m in CORE if m != "slerp")
    return tuple(all_configs(dict.fromkeys("abc", "") | {"base": ""})) if arch in FULL else CORE


PARITY = [
    pytest.param(
        a, m, id=f"{a}-{m}",
        marks=[pytest.mark.xfail(strict=True, reason=KNOWN_GAPS[a, m])] if (a, m) in KNOWN_GAPS else [],
    )
    for a in ARCHS for m in methods_for(a)
]  # fmt: skip

DRIVER = """
import sys, traceback
from pathlib import Path
from mergekit.scripts.run_yaml import main
for cfg, out in zip(sys.argv[1::2], sys.argv[2::2]):
    try:
        main([cfg, out, "--no-copy-tokenizer", "--quiet"], standalone_mode=False)
    except Exception:
        Path(out + ".error").write_text(traceback.format_exc())
"""


@pytest.fixture(scope="session")
def families(tmp_path_factory) -> dict[str, dict[str, Path]]:
    root = tmp_path_factory.mktemp("archs")
    return {name: save_family(arch, root / name) for name, arch in ARCHS.items()}


@pytest.fixture(scope="session")
def mergekit_outputs(families, tmp_path_factory) -> Path:
    """Every parity config of every architecture through mergekit-yaml, in one process."""
    root = tmp_path_factory.mktemp("mk_archs")
    argv: list[str] = []
    for arch, method in (p.values for p in PARITY):
        path = root / f"{arch}-{method}.yaml"
        path.write_text(yaml.safe_dump(arch_configs(families[arch])[method]))
        argv += [str(path), str(root / f"mk-{arch}-{method}")]
    subprocess.run([sys.executable, "-c", DRIVER, *argv], check=True, capture_output=True)
    return root


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def live_layout(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint as transformers holds it in memory (its own conversion: fused experts)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def max_rel(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> float:
    worst = 0.0
    for name, ref in theirs.items():
        got = ours[name]
        assert got.shape == ref.shape and got.dtype == ref.dtype, name
        scale = ref.double().abs().max().clamp_min(1e-12)
        worst = max(worst, ((got.double() - ref.double()).abs().max() / scale).item())
    return worst


@pytest.mark.mergekit
@pytest.mark.skipif(NO_MERGEKIT, reason="mergekit extra not installed")
@pytest.mark.parametrize(("arch", "method"), PARITY)
def test_merge_equals_mergekit(arch, method, mergekit_outputs, tmp_path):
    cfg = mergekit_outputs / f"{arch}-{method}.yaml"
    out = tmp_path / "ev"
    assert main(["merge", str(cfg), "--out", str(out), "--quiet"]) == 0
    theirs_dir = mergekit_outputs / f"mk-{arch}-{method}"
    error = theirs_dir.with_name(theirs_dir.name + ".error")
    assert not error.exists(), f"mergekit-yaml failed: {error.read_text()[-1500:]}"
    if arch in SPLIT_MOE:  # mergekit writes transformers' fused layout: compare in that layout
        ours, theirs = live_layout(out), load_dir(theirs_dir)
        assert set(theirs) == set(ours)
    else:
        ours, theirs = load_dir(out), load_dir(theirs_dir)
        assert ours.keys() == theirs.keys()
    worst = max_rel(ours, theirs)
    assert worst <= 1e-5, f"{arch} {method}: max relative error {worst:.2e}"


IN_PLACE = [(a, "ties", "device") for a in ARCHS] + [
    (a, m, tier)
    for a in ("mixtral", "qwen3_moe")
    for m, tier in (("slerp", "device"), ("model_stock", "disk"), ("breadcrumbs", "host"))
]  # the split MoE: fused experts read through every residency tier's loaders


@pytest.mark.parametrize(
    ("arch", "method", "tier"), IN_PLACE, ids=[f"{a}-{m}-{t}" for a, m, t in IN_PLACE]
)
def test_in_place_merge_equals_disk_merge(arch, method, tier, families, tmp_path):
    """The live model after an in-place merge holds exactly the disk merge loaded back."""
    from transformers import AutoModelForCausalLM

    from evomerge.merge import MergeSettings, merge_to_disk
    from evomerge.plan import open_readers
    from evomerge.recipe_loader import load_recipe_file
    from evomerge.residency.stores import make_sources
    from evomerge.resident import InPlaceMerger

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(arch_configs(families[arch])[method]))
    recipe = load_recipe_file(cfg)
    merge_to_disk(recipe, MergeSettings(out_dir=tmp_path / "disk", progress=False))
    readers = open_readers(recipe)
    live = AutoModelForCausalLM.from_pretrained(families[arch]["s1"], dtype=torch.float32)
    with torch.no_grad():  # so every parameter the merge misses shows
        for p in live.parameters():
            p.zero_()
    merger = InPlaceMerger.for_model(live, recipe, readers, make_sources(tier, readers))
    merger.apply(recipe)
    expected = live_layout(tmp_path / "disk")
    got = live.state_dict()
    assert got.keys() == expected.keys()
    for name, ref in expected.items():  # every parameter, a tied head and fused experts too
        # a few ulps: torch.lerp's vector and scalar paths round differently by alignment
        torch.testing.assert_close(got[name], ref, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("arch", SPLIT_MOE)
def test_fused_stack_is_the_live_tensor(arch, families):
    """A fusion stacks the checkpoint's expert tensors into exactly the parameter transformers
    loads them into, and covers every expert tensor."""
    from transformers import AutoModelForCausalLM

    from evomerge.checkpoint import CheckpointReader
    from evomerge.fusion import checkpoint_fusions
    from evomerge.memory_plan import Footprint

    reader = CheckpointReader(families[arch]["s1"])
    fusions = checkpoint_fusions(reader)
    live = AutoModelForCausalLM.from_pretrained(families[arch]["s1"], dtype=torch.float32)
    state = live.state_dict()
    experts = {n for n in reader.names() if ".experts." in n}
    assert {p[0] for f in fusions for p in f.parts} == experts
    assert len(fusions) == 2 * live.config.num_hidden_layers  # gate_up_proj and down_proj
    # the memory plan's largest tensor of a task is the stack
    assert Footprint.of({"s1": reader}, "s1").largest == max(math.prod(f.shape) for f in fusions)
    for f in fusions:
        stack = torch.empty(f.shape)
        for piece, (name, *_) in zip(f.pieces(stack), f.parts, strict=True):
            piece.copy_(reader.get(name))
        assert torch.equal(stack, state[f.name]), f.name


def test_experts_fuse_only_where_their_tasks_agree(families, tmp_path):
    """Weighted sums stay per tensor; a value that tells gate (`w1`) from up (`w3`) keeps those
    tensors per tensor while the layer's `w2` still fuse; a frankenmerge fuses whole blocks
    under the output's names."""
    from evomerge.checkpoint import layer_index
    from evomerge.fusion import FusedTask, plan_units
    from evomerge.merge import MergeSettings, merge_to_disk
    from evomerge.plan import open_readers, plan_merge
    from evomerge.recipe_loader import load_recipe_file

    fam = {k: str(v) for k, v in families["mixtral"].items()}

    def units(cfg: dict, name: str) -> tuple[list, Path]:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({**cfg, "dtype": "float32"}))
        recipe = load_recipe_file(path)
        readers = open_readers(recipe)
        got = plan_units(plan_merge(recipe, readers), readers, recipe.reference_model, recipe.seed)
        merge_to_disk(recipe, MergeSettings(out_dir=tmp_path / name, progress=False))
        return [u for u in got if isinstance(u, FusedTask)], tmp_path / name

    linear = {
        "merge_method": "linear",
        "models": [{"model": fam[s], "parameters": {"weight": 0.5}} for s in ("s1", "s2")],
    }
    assert units(linear, "linear")[0] == []
    density = [{"filter": ".w1.", "value": 0.3}, {"value": 0.6}]
    ties = {
        "merge_method": "ties",
        "base_model": fam["base"],
        "models": [{"model": fam[s], "parameters": {"weight": 0.5, "density": density}}
                   for s in ("s1", "s2")],
    }  # fmt: skip
    fused, _ = units(ties, "ties")
    assert sorted(u.fused.name.rsplit(".", 1)[1] for u in fused) == ["down_proj"] * 2
    slerp = {"merge_method": "slerp", "base_model": fam["s1"], "parameters": {"t": 0.3}}
    plain = {**slerp, "models": [{"model": fam["s1"]}, {"model": fam["s2"]}]}
    block = [{"model": fam[s], "layer_range": [1, 2]} for s in ("s1", "s2")]
    fused, out = units({**slerp, "slices": [{"sources": block}]}, "slices")
    assert {u.fused.name for u in fused} == {
        "model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"
    }  # fmt: skip
    assert {layer_index(n) for u in fused for m in u.members for n in m.out.sources.values()} == {1}
    _, whole = units(plain, "plain")  # output block 0 of the slice is block 1 of the plain merge
    sliced, ref = load_dir(out), load_dir(whole)
    for name, t in sliced.items():
        if ".layers.0." in name:
            assert torch.equal(t, ref[name.replace(".layers.0.", ".layers.1.")]), name


def write_study(root: Path, fam: dict[str, Path]) -> Path:
    tasks = root / "tasks"
    tasks.mkdir(parents=True, exist_ok=True)
    write_task(tasks, "tiny_search", seed=1, n=6)
    study = {
        "name": "arch",
        "models": {
            "base": str(fam["base"]),
            "sources": [{"name": "s1", "path": str(fam["s1"])}, {"name": "s2", "path": str(fam["s2"])}],
        },
        "search_space": {"preset": "method_choice", "granularity": 1},
        "tasks": {"include_path": [str(tasks)], "search": ["tiny_search"], "batch_size": 8},
        "optimizer": {"name": "cma", "popsize": 3, "sigma0": 0.3},
        "budget": {"max_trials": 3},
        "device": "cpu",
        "seed": 0,
    }  # fmt: skip
    path = root / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


@pytest.mark.parametrize("arch", list(ARCHS))
def test_study_runs_and_export_generates(arch, families, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    study = write_study(tmp_path, families[arch])
    runs = tmp_path / "runs"
    assert main(["run", str(study), "--runs-dir", str(runs), "--quiet"]) == 0
    trials = [json.loads(x) for x in (runs / "arch" / "trials.jsonl").read_text().splitlines()]
    assert len(trials) == 3
    assert all(t["status"] == "ok" and t["error"] is None for t in trials), trials
    out = tmp_path / "export"
    assert main(["export", str(runs / "arch"), "--out", str(out), "--quiet"]) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("Q: w1 w2 A:", return_tensors="pt").input_ids
    gen = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape[1] == ids.shape[1] + 3
    # the export is the best trial's recipe, merged on disk: the same tensors as a fresh merge
    assert (
        main(["merge", str(out / "recipe.yaml"), "--out", str(tmp_path / "again"), "--quiet"]) == 0
    )
    assert max_rel(load_dir(tmp_path / "again"), load_dir(out)) == 0.0


@pytest.mark.parametrize("arch", list(ARCHS))
def test_preset_attention_group_is_the_attention_modules(arch, families):
    """A preset's `self_attn` group covers exactly the tensors of the architecture's attention
    modules (transformers' `...Attention` classes), whatever they are called."""
    from transformers import AutoModelForCausalLM

    from evomerge.checkpoint import CheckpointReader, layer_index
    from evomerge.space import fit_tensor_groups, load_space

    names = CheckpointReader(families[arch]["base"]).names()
    space = fit_tensor_groups(load_space("method_choice", None, "search_space"), names, "s")
    attn = next(g for g in space.tensor_groups if g.name == "attn")
    model = AutoModelForCausalLM.from_pretrained(families[arch]["base"])
    expected = {
        f"{path}.{p}"
        for path, module in model.named_modules()
        if type(module).__name__.endswith("Attention")
        for p, _ in module.named_parameters()
    } & set(names)
    got = {n for n in names if layer_index(n) is not None and attn.filter in n}
    assert expected and got == expected


def test_probe_views_are_exact_or_refused():
    """The index probe is read as a strided view only when every element agrees."""
    from evomerge.architectures import _as_view

    idx = torch.arange(100, 100 + 4 * 6 * 5).view(4, 6, 5)  # a parameter's indices from 100
    local = idx - 100
    for part in (idx[2, 3:, :], idx[:, ::2, 1].t()):  # an expert's `up` half; strided, transposed
        size, stride, offset = _as_view(part, 100, idx.numel())
        assert torch.equal(local.reshape(-1).as_strided(size, stride, offset) + 100, part)
    shuffled = idx[1].reshape(-1)[torch.randperm(30, generator=torch.Generator().manual_seed(0))]
    assert _as_view(shuffled.view(6, 5), 100, idx.numel()) is None
    assert _as_view(idx[1] + 200, 100, idx.numel()) is None  # past the parameter's end


def test_role_filter_keeps_matching_filters():
    from evomerge.architectures import role_filter

    llama = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight"]
    gpt2 = ["transformer.h.0.attn.c_attn.weight", "transformer.h.0.mlp.c_fc.weight"]
    assert role_filter("self_attn", llama) is None
    assert role_filter("self_attn", gpt2) == (".attn.", "attention")
    assert role_filter("q_proj", gpt2) is None  # not a role's name: left as the user wrote it
