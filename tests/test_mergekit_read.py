"""Reading mergekit YAML as mergekit reads it (no mergekit needed; test_mergekit_configs runs the
real one on real users' configs), and the checks against the model files."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from evomerge.errors import ConfigError
from evomerge.mergekit_files import check_mergekit_files
from evomerge.mergekit_read import from_mergekit, read_mergekit
from evomerge.recipe import FilterValue
from tests.model_factory import save_tiny_llama
from tests.test_mergekit_configs import save_tokenizer


def warnings_of(caplog, data) -> list[str]:
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="evomerge.mergekit"):
        from_mergekit(data, where="cfg")
    return [r.getMessage().removeprefix("evomerge: warning: ") for r in caplog.records]


def test_models_form_is_one_section_with_the_base_as_an_input():
    r = from_mergekit(
        {
            "merge_method": "ties",
            "base_model": "/x/base",
            "models": [
                {"model": "/x/math-7b", "parameters": {"weight": 0.5, "density": [0.1, 0.9]}},
                {"model": "/y/math-7b", "parameters": {"weight": 0.3}},
            ],
            "parameters": {"normalize": True},
            "dtype": "float32",
            "out_dtype": "bfloat16",
            "tokenizer_source": "base",
        }
    )
    assert r.models == {"base": "/x/base", "math-7b": "/x/math-7b", "math-7b-2": "/y/math-7b"}
    assert r.base_model == "base" and r.tokenizer_source == "base" and r.dtype == "bfloat16"
    (section,) = r.sections
    assert section.label == "models" and section.layers is None and section.filter is None
    assert section.parameters == {"normalize": True}
    assert section.models == {
        "math-7b": {"weight": 0.5, "density": [0.1, 0.9]},
        "math-7b-2": {"weight": 0.3},
        "base": {},  # mergekit: "Base model specified but not in input models - adding"
    }


def test_pinned_hub_revisions_stay_part_of_the_reference(tmp_path):
    """mergekit's `org/name@revision` and ModelPath {path, revision} are one reference each
    (resolved with that revision by checkpoint.resolve_model_path); names drop the revision,
    and a local folder whose name holds '@' is a folder."""
    folder = tmp_path / "m@local"
    folder.mkdir()
    r = from_mergekit(
        {
            "merge_method": "linear",
            "models": [
                {"model": "org/m@v2", "parameters": {"weight": 1}},
                {"model": {"path": "org/n", "revision": "a" * 40}, "parameters": {"weight": 1}},
                {
                    "model": {"model": {"path": "org/m", "revision": "v1"}},
                    "parameters": {"weight": 1},
                },
                {"model": str(folder), "parameters": {"weight": 1}},
            ],
        }
    )
    assert r.models == {
        "m": "org/m@v2",
        "n": f"org/n@{'a' * 40}",
        "m-2": "org/m@v1",
        "m@local": str(folder),
    }


def test_slices_form_becomes_layer_sections_and_the_tensors_outside_them():
    r = from_mergekit(
        {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": "/m/a", "layer_range": [0, 3]}]},
                {"sources": [{"model": "/m/b", "layer_range": [1, 4]}]},
            ],
        }
    )
    keys = {"layers", "filter", "outside", "label"}
    assert [s.model_dump(include=keys) for s in r.sections] == [
        {"layers": (0, 3), "filter": None, "outside": None, "label": "slices[0]"},
        {"layers": (3, 6), "filter": None, "outside": None, "label": "slices[1]"},
        {"layers": None, "filter": None, "outside": "pre", "label": "slices[0]"},
        {"layers": None, "filter": None, "outside": "post", "label": "slices[1]"},
    ]
    assert [list(s.models) for s in r.sections] == [["a"], ["b"], ["a"], ["b"]]
    assert r.slices is not None and [sl.length for sl in r.slices] == [3, 3]


def test_a_slice_filter_list_without_a_catch_all_falls_back_to_the_top_level():
    r = from_mergekit(
        {
            "merge_method": "ties",
            "base_model": "/m/base",
            "slices": [
                {
                    "sources": [
                        {"model": "/m/base", "layer_range": [0, 2]},
                        {"model": "/m/a", "layer_range": [0, 2], "parameters": {"weight": 1}},
                    ],
                    "parameters": {"density": [{"filter": "mlp", "value": 0.3}]},
                }
            ],
            "parameters": {"density": 0.9},
        }
    )
    assert r.sections[0].parameters["density"] == [
        FilterValue(filter="mlp", value=0.3),
        FilterValue(filter=None, value=0.9),
    ]


def test_scalars_are_coerced_as_pydantic_does_in_mergekit():
    r = from_mergekit(
        {
            "merge_method": "ties",
            "base_model": "/m/base",
            "models": [{"model": "/m/a", "parameters": {"weight": "5e-1", "density": ["1e-1", 1]}}],
            "parameters": {"normalize": "yes", "int8_mask": "false", "lambda": "1e0"},
        }
    )
    section = r.sections[0]
    assert section.models["a"] == {"weight": 0.5, "density": [0.1, 1.0]}
    assert section.parameters == {"normalize": True, "int8_mask": False, "lambda": 1.0}


def test_what_mergekit_ignores_is_one_warning_line_each(caplog):
    lines = warnings_of(
        caplog,
        {
            "merge_method": "linear",
            "models": [
                {"model": "/m/a", "parameters": {"weight": 1, "density": 0.5, "normalize": True}},
                {"model": "/m/b", "parameters": {"weight": 1, "density": 0.5}, "paramters": {}},
            ],
            "dype": "bfloat16",
            "normalize": False,
        },
    )
    assert lines == [
        "cfg: 'dype' is not a mergekit key; mergekit ignores it; did you mean 'dtype'?",
        "cfg: 'normalize' is not a mergekit key; mergekit ignores it; did you mean "
        "parameters.normalize?",
        "cfg: models[1]: 'paramters' is not a mergekit key; mergekit ignores it; did you mean "
        "'parameters'?",
        "cfg: parameter 'density' is not used by linear (it takes: weight, normalize); ignored, "
        "as mergekit does (in models[0] (/m/a), models[1] (/m/b))",
        "cfg: 'normalize' is a global parameter of linear; mergekit reads it only from the "
        "top-level or slice parameters and ignores it in models[0] (/m/a)",
    ]


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"merge_method": 3, "models": ["/a"]}, "merge_method must be a method name"),
        ({"merge_method": "lineer", "models": ["/a"]}, "did you mean 'linear'"),
        ({"merge_method": "linear"}, "give exactly one of `models` or `slices`"),
        ({"merge_method": "linear", "models": [3]}, r"models\[0\]: expected a model path, got 3"),
        ({"merge_method": "linear", "models": ["/a+/l+/x"]}, "is not BASE\\+ADAPTER"),
        ({"merge_method": "linear", "models": ["org/m@v2@v3"]}, "more than one '@'"),
        (
            {
                "merge_method": "linear",
                "models": [{"model": {"path": "org/m@v2", "revision": "v3"}}],
            },
            "already pins a revision",
        ),
        ({"merge_method": "linear", "modules": {"text": {}}}, "modules: .* is not supported"),
        (
            {
                "merge_method": "linear",
                "models": ["/a"],
                "tokenizer_source": "base",
                "tokenizer": {"source": "base"},
            },
            "give tokenizer_source or a tokenizer: block, not both",
        ),
        (
            {
                "merge_method": "linear",
                "base_model": "/b",
                "models": [{"model": "/a", "parameters": {"weight": 1}}],
            },
            r"base_model \(/b\): mergekit merges base_model as one more input of linear and "
            "needs its 'weight'",
        ),
        (
            {"merge_method": "ties", "base_model": "/b", "models": [{"model": "/a"}]},
            r"models\[0\] \(/a\): ties needs parameter 'weight' for this model",
        ),
        (
            {
                "merge_method": "ties",
                "base_model": "/b",
                "models": [{"model": "/a", "parameters": {"weight": "x"}}],
            },
            r"models\[0\] \(/a\): parameter 'weight': 'x' is not a number",
        ),
        (
            {
                "merge_method": "ties",
                "base_model": "/b",
                "models": [{"model": "/a", "parameters": {"weight": 1, "density": 2}}],
            },
            r"models\[0\] \(/a\): parameter 'density'=2.0 is outside",
        ),
        (
            {"merge_method": "slerp", "base_model": "/b", "models": ["/a", "/c"]},
            r"models: method 'slerp' takes exactly 2 models, got 3 \(with base_model",
        ),
        (
            {
                "merge_method": "ties",
                "base_model": "/b",
                "slices": [
                    {
                        "sources": [
                            {"model": "/a", "layer_range": [0, 2], "parameters": {"weight": 1}}
                        ]
                    }
                ],
            },
            r"slices\[0\]: base_model /b is not among this slice's sources",
        ),
        (
            {"merge_method": "passthrough", "slices": [{"sources": [{"model": "/a"}]}]},
            r"slices\[0\].sources\[0\] \(/a\): layer_range must be \[start, end\)",
        ),
    ],
)
def test_errors_name_what_the_user_wrote(data, needle):
    with pytest.raises(ConfigError, match=f"^cfg: .*{needle}") as info:
        from_mergekit(data, where="cfg")
    assert "sections[" not in str(info.value) and "\n" not in str(info.value)


def test_errors_found_per_tensor_name_the_users_section_not_ours():
    """A filter list without a catch-all leaves some tensors without a weight: the planner's
    error names `models` (what the user wrote), not `sections[0]`."""
    from evomerge.plan import OutTensor, resolve_task

    r = from_mergekit(
        {
            "merge_method": "ties",
            "base_model": "/m/base",
            "models": [
                {"model": "/m/a", "parameters": {"weight": [{"filter": "mlp", "value": 1}]}}
            ],
        },
        where="cfg",
    )
    out = OutTensor("model.embed_tokens.weight", None, (2, 2), {"base": "e", "a": "e"}, 0.0)
    with pytest.raises(ConfigError) as info:
        resolve_task(r, out)
    assert str(info.value).startswith("models (ties, tensor model.embed_tokens.weight), model a:")


# ------------------------------------------------------------ checks against the model files


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mkfiles")
    base = save_tiny_llama(root / "base", seed=1)
    save_tiny_llama(root / "a", seed=2, base=base)
    save_tiny_llama(root / "shuffled", seed=3, base=base)
    save_tiny_llama(root / "bf16", seed=4, base=base, dtype=torch.bfloat16)
    save_tiny_llama(root / "wide", seed=5, vocab=72)
    for name in ("base", "a", "bf16"):
        save_tokenizer(root / name)
    save_tokenizer(root / "shuffled", shuffle_seed=1)
    save_tokenizer(root / "wide", size=70)  # 70 tokens, 72 embedding rows
    return root


def check(root: Path, data: dict) -> None:
    mk = read_mergekit(data, where="cfg", base_dir=root)
    check_mergekit_files(mk, "cfg")


def ta(root: Path, *models: str, **extra) -> dict:
    return {
        "merge_method": "task_arithmetic",
        "base_model": str(root / "base"),
        "models": [{"model": str(root / m), "parameters": {"weight": 0.5}} for m in models],
        **extra,
    }


def test_a_shared_tokenizer_makes_union_and_base_the_identity(models):
    for source in ("union", "base", str(models / "a")):
        check(models, ta(models, "a", tokenizer_source=source))
    check(models, ta(models, "a", tokenizer={"source": "union", "pad_to_multiple_of": 16}))
    check(models, ta(models, "a", tokenizer={"tokens": {"w5": {"source": str(models / "a")}}}))


@pytest.mark.parametrize(
    ("extra", "source"),
    [({"tokenizer_source": "union"}, "union"), ({"tokenizer": {"source": "base"}}, "base")],
)
def test_a_different_vocabulary_is_read_for_the_rows_to_be_re_laid_out(models, extra, source):
    """Another vocabulary is no refusal since issue 15: the recipe keeps the tokenizer source
    and `evomerge.vocab` re-lays out the rows (tests/test_vocab.py checks them)."""
    check(models, ta(models, "a", "shuffled", **extra))
    mk = read_mergekit(ta(models, "a", "shuffled", **extra), where="cfg", base_dir=models)
    assert mk.recipe.tokenizer_source == source


def test_tokenizer_blocks_that_would_change_embedding_rows_are_refused(models):
    check(  # 72 rows for 70 tokens: mergekit keeps the 70 token rows, and so does evomerge.vocab
        models,
        {
            "merge_method": "linear",
            "models": [{"model": str(models / "wide"), "parameters": {"weight": 1}}],
            "tokenizer_source": "base",
        },
    )
    with pytest.raises(ConfigError, match=r"tokenizer\.tokens adds token 'new'"):
        check(models, ta(models, "a", tokenizer={"tokens": {"new": {}}}))
    check(models, ta(models, "a", tokenizer={"pad_to_multiple_of": 48}))  # padded: evomerge.vocab
    mk = read_mergekit(ta(models, "a", tokenizer={"pad_to_multiple_of": 48}), where="c")
    assert mk.recipe.tokenizer_source == "union" and mk.recipe.pad_to_multiple_of == 48


def test_a_dtype_that_rounds_the_sources_is_a_warning(models, caplog):
    with caplog.at_level(logging.WARNING, logger="evomerge.mergekit"):
        check(models, ta(models, "a", dtype="bfloat16"))
        assert (
            "dtype bfloat16: mergekit casts the sources (model 'base' is stored as float32)"
            in caplog.text
        )
        caplog.clear()
        check(models, ta(models, "a", dtype="float32"))
        data = {
            "merge_method": "linear",
            "models": [{"model": str(models / "bf16"), "parameters": {"weight": 1}}],
            "dtype": "bfloat16",
        }
        check(models, data)
        data["dtype"] = "float32"  # bfloat16 -> float32 is exact
        check(models, data)
    assert caplog.text == ""
