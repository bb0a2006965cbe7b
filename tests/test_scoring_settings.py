"""ScoringSettings: one frozen shape for what to score, checked at construction, shipped as is."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import pytest
from pydantic import ValidationError

from evomerge.errors import ConfigError
from evomerge.scoring import ScoringSettings


def test_names_and_paths_become_tuples_of_strings():
    s = ScoringSettings(tasks=["a", "b"], include_paths="evals")
    assert s.tasks == ("a", "b") and s.include_paths == ("evals",)
    assert ScoringSettings(tasks="arc_easy").tasks == ("arc_easy",)  # one name, not its letters
    assert ScoringSettings(tasks=("a",), include_paths=[Path("/x"), "y"]).include_paths == (
        "/x",
        "y",
    )


def test_defaults_match_simple_evaluate():
    s = ScoringSettings(tasks=("a",))
    assert (s.include_paths, s.limit, s.num_fewshot) == ((), None, None)
    assert (s.batch_size, s.apply_chat_template) == (16, False)
    assert (s.fewshot_seed, s.seed) == (1234, 1234)  # lm-eval's own defaults


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"tasks": ()}, "scoring tasks: need one or more task names, got []"),
        ({"tasks": ["a", " "]}, "scoring tasks: need one or more task names, got ['a', ' ']"),
        ({"tasks": [3]}, "scoring tasks: need one or more task names, got [3]"),
        ({"tasks": ("b", "a", "b", "a")}, "scoring tasks: a, b listed more than once"),
        ({"batch_size": 0}, "scoring batch_size must be an integer >= 1, got 0"),
        ({"batch_size": True}, "scoring batch_size must be an integer >= 1, got True"),
        ({"batch_size": 4.0}, "scoring batch_size must be an integer >= 1, got 4.0"),
        ({"limit": 0}, "scoring limit must be a count >= 1 or a fraction in (0, 1), got 0"),
        ({"limit": 2.5}, "scoring limit must be a count >= 1 or a fraction in (0, 1), got 2.5"),
        ({"limit": -0.5}, "scoring limit must be a count >= 1 or a fraction in (0, 1), got -0.5"),
        (
            {"limit": math.inf},
            "scoring limit must be a count >= 1 or a fraction in (0, 1), got inf",
        ),
        ({"limit": "5"}, "scoring limit must be a count >= 1 or a fraction in (0, 1), got '5'"),
        ({"limit": True}, "scoring limit must be a count >= 1 or a fraction in (0, 1), got True"),
        ({"num_fewshot": -1}, "scoring num_fewshot must be an integer >= 0, got -1"),
        ({"num_fewshot": 1.0}, "scoring num_fewshot must be an integer >= 0, got 1.0"),
    ],
)
def test_bad_values_raise_config_error_naming_the_rule(fields, message):
    with pytest.raises(ConfigError) as exc:
        ScoringSettings(**{"tasks": ("a",), **fields})
    assert str(exc.value) == message
    assert not isinstance(exc.value, ValidationError)  # ours, one line, for the CLI's exit 2


@pytest.mark.parametrize("limit", [1, 10, 10.0, 0.25, 0.999])
def test_counts_and_fractions_are_limits(limit):
    s = ScoringSettings(tasks=("a",), limit=limit)
    assert s.limit == limit and type(s.limit) is type(limit)  # 10.0 stays a float, as before


def test_unknown_or_mistyped_settings_name_the_setting():
    with pytest.raises(ConfigError, match=r"unknown setting 'batchsize'; the settings are tasks,"):
        ScoringSettings(tasks=("a",), batchsize=4)
    with pytest.raises(ConfigError, match=r"^scoring seed: input should be a valid integer"):
        ScoringSettings(tasks=("a",), seed="x")
    with pytest.raises(ConfigError, match=r"^scoring tasks: required"):
        ScoringSettings()


def test_frozen_hashable_and_picklable_for_ray():
    s = ScoringSettings(tasks=("a", "b"), include_paths=("p",), limit=0.5, batch_size=4)
    with pytest.raises(ValidationError):
        s.limit = 3  # type: ignore[misc]
    same = ScoringSettings(tasks=["a", "b"], include_paths="p", limit=0.5, batch_size=4)
    assert s == same and hash(s) == hash(same)
    assert s != ScoringSettings(tasks=("a", "b"), include_paths=("p",), limit=0.5)
    assert len({s, same}) == 1
    back = pickle.loads(pickle.dumps(s))
    assert back == s and type(back.tasks) is tuple


def test_every_setting_says_why():
    for name, field in ScoringSettings.model_fields.items():
        assert field.description and len(field.description) > 30, name
