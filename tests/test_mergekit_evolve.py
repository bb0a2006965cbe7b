"""mergekit-evolve configs as studies: the mapping, its genes against mergekit's own genome
decoder, and a real run of a demo-zoo evolve config (`evomerge run`, `export`, `convert`)."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import yaml

from evomerge.cli import main
from evomerge.config import parse_study
from evomerge.errors import ConfigError
from evomerge.mergekit_evolve import convert_file, evolve_to_study, parse_evolve
from evomerge.mergekit_read import from_mergekit
from evomerge.model_set import ModelSet
from evomerge.plan import build_layout, open_readers, resolve_task
from evomerge.space import SearchSpace, load_space
from tests.model_factory import save_tiny_llama

HAS_MERGEKIT = importlib.util.find_spec("mergekit") is not None


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """base (4 layers) and three fine-tunes of it."""
    root = tmp_path_factory.mktemp("evo")
    base = save_tiny_llama(root / "base", seed=20)
    for i, name in enumerate(("math", "code", "chat")):
        save_tiny_llama(root / name, seed=21 + i, base=base, noise=0.05)
    return root


def genome_cfg(root: Path, **genome) -> dict:
    return {
        "genome": {
            "models": [str(root / m) for m in ("math", "code", "chat")],
            "merge_method": "task_arithmetic",
            "base_model": str(root / "base"),
            **genome,
        },
        "tasks": [{"name": "t1", "metric": "exact_match,none", "weight": 2.0}, "t2"],
    }


def convert(root: Path, data: dict, **kw) -> dict:
    study, _ = evolve_to_study(
        parse_evolve(data, "evolve.yml"), name="evo", where="evolve.yml", base_dir=root, **kw
    )
    return study


def test_the_study_has_mergekit_evolves_genes_start_point_and_fitness(tiny):
    study = convert(tiny, genome_cfg(tiny, layer_granularity=2, filters=["self_attn"]))
    parse_study(study, "evolve.yml")  # a valid study
    space = study["search_space"]
    assert space["granularity"] == 2 and not space["global_group"]
    assert space["outside_blocks"] == "first_last" and space["smooth"] is False
    assert space["tensor_groups"] == [
        {"name": "self_attn", "filter": "self_attn"},
        {"name": "rest"},
    ]
    ta = space["methods"]["task_arithmetic"]
    assert ta["per_model"] == {"weight": {"low": 0.0, "high": 1.0, "init": round(1 / 3, 6)}}
    assert ta["parameters"] == {"normalize": False, "int8_mask": True}
    assert study["models"]["base"] == str(tiny / "base")
    assert [s["name"] for s in study["models"]["sources"]] == ["math", "code", "chat"]
    assert study["objective"]["metrics"] == [
        {"task": "t1", "metric": "exact_match,none", "weight": 2.0, "direction": "maximize"},
        {"task": "t2", "metric": "acc,none", "weight": 1.0, "direction": "maximize"},
    ]
    assert study["tasks"]["search"] == ["t1", "t2"] and study["tasks"]["heldout"] == []
    assert study["tasks"]["apply_chat_template"] is True  # mergekit-evolve's default
    assert study["optimizer"] == {"name": "cma", "sigma0": round(1 / 6, 6)}
    assert study["budget"] == {"max_trials": 100} and study["seed"] == 0
    assert study["dtype"] == "bfloat16"


def test_ties_searches_density_and_negative_weights_widen_the_range(tiny):
    study = convert(tiny, genome_cfg(tiny, merge_method="ties", allow_negative_weights=True))
    ties = study["search_space"]["methods"]["ties"]
    assert ties["per_model"]["weight"] == {"low": -1.0, "high": 1.0, "init": round(1 / 3, 6)}
    assert ties["per_model"]["density"] == {"low": 0.01, "high": 1.0, "init": 1.0}
    assert ties["parameters"]["normalize"] is True
    assert study["optimizer"]["sigma0"] == round(1 / 12, 6)  # 1/6 of mergekit's units
    assert study["search_space"]["granularity"] == 4  # layer_granularity 0: one group


def test_a_base_listed_among_the_models_gets_no_genes(tiny, caplog):
    data = genome_cfg(tiny)
    data["genome"]["models"].append(str(tiny / "base"))
    with caplog.at_level(logging.WARNING, logger="evomerge.mergekit"):
        study = convert(tiny, data)
    assert [s["name"] for s in study["models"]["sources"]] == ["math", "code", "chat"]
    assert "genome.models lists the base_model" in caplog.text
    # the start point is mergekit-evolve's: 1/N over the N models it lists
    assert (
        study["search_space"]["methods"]["task_arithmetic"]["per_model"]["weight"]["init"] == 0.25
    )


@pytest.mark.parametrize(
    ("genome", "needle"),
    [
        ({"merge_method": "slerp"}, "slerp is not supported: mergekit-evolve picks the two"),
        ({"merge_method": "della"}, "not one of mergekit-evolve's methods"),
        ({"base_model": None}, "genome.base_model is required for task_arithmetic"),
        ({"layer_granularity": 3}, "layer_granularity 3 does not divide the 4 layers"),
        ({"merge_method": "linear"}, "genome.base_model with linear: mergekit-evolve adds it"),
        ({"models": ["a/b+l/x+y", "c"]}, "is not BASE\\+ADAPTER"),
    ],
)
def test_what_cannot_run_is_refused_in_one_line(tiny, genome, needle):
    with pytest.raises(ConfigError, match=needle) as info:
        convert(tiny, genome_cfg(tiny, **genome))
    assert "\n" not in str(info.value)


def test_a_chat_template_the_tokenizer_lacks_is_refused_before_anything_runs(tiny, tmp_path):
    import shutil

    from tests.test_mergekit_configs import save_tokenizer

    base = tmp_path / "base"
    shutil.copytree(tiny / "base", base)
    save_tokenizer(base)  # a tokenizer without a chat template
    data = genome_cfg(tiny, base_model=str(base))
    with pytest.raises(ConfigError, match=r"apply_chat_template is true .* has no chat template"):
        convert(tiny, data)
    data["apply_chat_template"] = False
    assert convert(tiny, data)["tasks"]["apply_chat_template"] is False


def test_unknown_keys_and_unsupported_settings_warn_once_each(tiny, caplog):
    data = genome_cfg(tiny)
    data["genome"]["layer_granulrity"] = 1
    data.update(limit=10, shuffle=True, random_init=True, num_fewshot=2)
    data["apply_chat_template"] = True
    data["fewshot_as_multiturn"] = False
    with caplog.at_level(logging.WARNING, logger="evomerge.mergekit"):
        convert(tiny, data)
    lines = [r.getMessage() for r in caplog.records]
    assert any(
        "genome: 'layer_granulrity' is not a mergekit-evolve key; mergekit-evolve ignores it; "
        "did you mean 'layer_granularity'?" in m
        for m in lines
    ), lines
    for needle in ("random_init: true is not supported", "shuffle: true is not supported"):
        assert sum(needle in m for m in lines) == 1, lines
    assert any("fewshot_as_multiturn: false is not supported" in m for m in lines)
    assert all("\n" not in m for m in lines)


def test_convert_prints_a_commented_study_that_loads(tiny, tmp_path, capsys):
    path = tmp_path / "evolve.yml"
    path.write_text(yaml.safe_dump(genome_cfg(tiny, layer_granularity=1)))
    assert main(["convert", str(path), "--max-trials", "7", "--seed", "3"]) == 0
    text = capsys.readouterr().out
    assert "# tasks.heldout is empty: mergekit-evolve has no held-out tasks" in text
    data = yaml.safe_load(text)
    assert data["budget"]["max_trials"] == 7 and data["seed"] == 3 and data["name"] == "evolve"
    out = tmp_path / "study.yaml"
    assert main(["convert", str(path), "--out", str(out)]) == 0
    assert main(["convert", str(path), "--out", str(out)]) == 2  # exists: --force to replace
    assert "exists" in capsys.readouterr().err
    assert yaml.safe_load(out.read_text())["budget"]["max_trials"] == 100


def _space(study: dict) -> SearchSpace:
    paths = {s["name"]: s["path"] for s in study["models"]["sources"]}
    base = study["models"]["base"]
    models = ModelSet(paths={"base": base, **paths} if base else paths, base=base and "base")
    return SearchSpace(load_space(None, study["search_space"], "x"), models, num_layers=4)


def _resolved(recipe, readers) -> dict[str, tuple]:
    """Each tensor's method and parameters per model path, as the planner resolves them."""
    out = {}
    for t in (resolve_task(recipe, o) for o in build_layout(recipe, readers)):
        per_model = {
            recipe.models[m]: dict(sorted(p.items()))
            for m, p in zip(t.models, t.model_params, strict=True)
        }
        out[t.out.name] = (t.method.name, per_model, dict(sorted(t.global_params.items())))
    return out


GENOMES = [
    {"merge_method": "task_arithmetic", "layer_granularity": 1},
    {"merge_method": "ties", "layer_granularity": 2, "filters": ["self_attn", "mlp.down"]},
    {"merge_method": "dare_ties", "layer_granularity": 1, "filters": ["norm"], "smooth": True},
    {"merge_method": "linear", "base_model": None, "layer_granularity": 1, "smooth": True},
    {"merge_method": "linear", "base_model": None, "filters": ["q_proj"], "normalize": False},
]


@pytest.mark.mergekit
@pytest.mark.skipif(not HAS_MERGEKIT, reason="mergekit extra not installed")
@pytest.mark.parametrize("genome", GENOMES, ids=lambda g: "-".join(f"{v}" for v in g.values()))
def test_every_tensor_gets_the_values_mergekit_evolve_decodes(tiny, genome):
    """The same genotype through mergekit's own decoder (ModelGenome.genotype_merge_config,
    read back as mergekit reads it) and through our study's search space: every tensor gets the
    same method and parameter values."""
    from mergekit.evo.genome import METHOD_PARAM_MAPS, ModelGenome, ModelGenomeDefinition

    data = genome_cfg(tiny, **genome)
    study = convert(tiny, data)
    space = _space(study)
    g = data["genome"]
    definition = ModelGenomeDefinition.model_validate(g)
    mk = ModelGenome(definition)
    shape = mk.initial_genotype().shape  # (layer groups, models, filters + 1, parameters)
    rng = np.random.default_rng(0)
    x = np.round(rng.uniform(0.05, 0.95, size=tuple(shape)), 6)  # inside our ranges: abs() is x
    params = METHOD_PARAM_MAPS[g["merge_method"]]
    sources = [s["name"] for s in study["models"]["sources"]]
    groups = [tg["name"] for tg in study["search_space"]["tensor_groups"]]
    gran = study["search_space"]["granularity"]
    genes = {}
    for li in range(shape[0]):
        for mi, model in enumerate(sources):
            for si, tg in enumerate(groups):
                for pi, p in enumerate(params):
                    key = (
                        f"L{li * gran}-{li * gran + gran - 1}.{tg}.{g['merge_method']}.{model}.{p}"
                    )
                    genes[key] = float(x[li, mi, si, pi])
    assert set(genes) == {d.name for d in space.dimensions()}  # the same genes, one for one
    ours = space.decode(genes)
    config = mk.genotype_merge_config(x).model_dump(mode="json", exclude_none=True)
    theirs = from_mergekit(config, where="mergekit-evolve")
    readers = open_readers(ours)
    a, b = _resolved(ours, readers), _resolved(theirs, open_readers(theirs))
    assert a.keys() == b.keys()
    for name in a:
        assert a[name][0] == b[name][0], name
        assert a[name][1].keys() == b[name][1].keys(), name
        for path, p in a[name][1].items():
            for key, value in p.items():
                assert value == pytest.approx(b[name][1][path][key], abs=1e-12), (name, key)
        for key, value in a[name][2].items():
            assert b[name][2][key] == value, (name, key)


@pytest.mark.slow
def test_a_demo_zoo_evolve_config_runs_exports_and_converts(small_zoo, tmp_path, capsys):
    """Acceptance: the demo zoo's mergekit-evolve config (task arithmetic, layer_granularity 1,
    the three search tasks) runs to its budget with `evomerge run`, exports, and `evomerge
    convert` prints a study that `evomerge run` accepts and that runs the same trials."""
    root = Path(small_zoo.root)
    evolve = tmp_path / "zoo-evolve.yml"
    evolve.write_text(
        yaml.safe_dump(
            {
                "genome": {
                    "models": [str(root / s) for s in ("add", "facts", "reverse")],
                    "merge_method": "task_arithmetic",
                    "base_model": str(root / "base"),
                    "layer_granularity": 1,
                },
                "tasks": [
                    {"name": "zoo_add_search", "metric": "exact_match,none"},
                    {"name": "zoo_facts_search"},
                    {"name": "zoo_reverse_search", "metric": "exact_match,none"},
                ],
                "num_fewshot": 0,
                "apply_chat_template": False,
            }
        )
    )
    evals = str(small_zoo.evals)
    flags = ["--task-search-path", evals, "--max-trials", "6", "--quiet"]
    runs = tmp_path / "runs"
    assert main(["run", str(evolve), "--runs-dir", str(runs), *flags]) == 0
    run_dir = runs / "zoo-evolve"
    trials = [json.loads(line) for line in (run_dir / "trials.jsonl").read_text().splitlines()]
    assert len(trials) == 6 and all(t["status"] in ("ok", "duplicate") for t in trials)
    n_layers = 2  # the small zoo
    assert len(trials[0]["genome"]) == n_layers * 3  # a weight per layer and model, nothing else
    out = tmp_path / "export"
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    assert (out / "model.safetensors").exists() and (out / "recipe.yaml").exists()
    study = tmp_path / "study.yaml"
    assert main(["convert", str(evolve), "--task-search-path", evals, "--out", str(study)]) == 0
    capsys.readouterr()
    runs2 = tmp_path / "runs2"
    assert main(["run", str(study), "--runs-dir", str(runs2), "--max-trials", "6", "--quiet"]) == 0
    again = [
        json.loads(line)
        for line in (runs2 / "zoo-evolve" / "trials.jsonl").read_text().splitlines()
    ]
    assert [(t["genome"], t["fitness"]) for t in again] == [
        (t["genome"], t["fitness"]) for t in trials
    ]
    assert convert_file(evolve, task_search_path=[evals])[0]["tasks"]["heldout"] == []


def test_smooth_and_outside_blocks_need_one_method_and_no_global_group():
    base = {"methods": {"linear": {"per_model": {"weight": 0.5}}}}
    for extra in ({"smooth": True}, {"outside_blocks": "first_last"}):
        with pytest.raises(ConfigError, match="need global_group false and one method"):
            load_space(None, {**base, **extra}, "space")
        assert load_space(None, {**base, **extra, "global_group": False}, "space")
