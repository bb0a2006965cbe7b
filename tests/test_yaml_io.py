"""YAML reading and validation messages: one-line user errors naming the file, line or field."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from evomerge.cli import main
from evomerge.errors import ConfigError, MissingPathError
from evomerge.yaml_io import format_validation_error, read_yaml, validate_model


class Point(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    x: int
    y: int = Field(0, ge=0)


def test_read_yaml_parses_and_missing_file_is_missing_path(tmp_path):
    path = tmp_path / "a.yaml"
    path.write_text("a: 1\nb: [x, y]\n")
    assert read_yaml(path) == {"a": 1, "b": ["x", "y"]}
    with pytest.raises(MissingPathError, match=r"nope\.yaml: file does not exist"):
        read_yaml(tmp_path / "nope.yaml")


def test_syntax_error_names_line_and_column(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("a: 1\nb: [x, y\n")
    with pytest.raises(ConfigError) as info:
        read_yaml(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: YAML syntax error at line 3, column 1: ")
    assert "\n" not in msg


def test_format_validation_error_first_error_with_count():
    with pytest.raises(ValidationError) as one:
        Point.model_validate({"x": 1, "y": -1})
    assert format_validation_error(one.value) == "y: Input should be greater than or equal to 0"
    with pytest.raises(ValidationError) as two:
        Point.model_validate({"x": "a", "z": 1})
    assert format_validation_error(two.value) == (
        "x: Input should be a valid integer, unable to parse string as an integer (and 1 more)"
    )


def test_format_validation_error_drops_value_error_prefix_and_empty_location():
    class Checked(BaseModel):
        a: int

        def model_post_init(self, _ctx: object) -> None:
            if self.a < 0:
                raise ValueError("a must not be negative")

    with pytest.raises(ValidationError) as info:
        Checked(a=-1)
    assert format_validation_error(info.value) == "a must not be negative"


def test_validate_model_turns_validation_errors_into_config_errors():
    assert validate_model(Point, {"x": 3}, "p.yaml") == Point(x=3, y=0)
    with pytest.raises(ConfigError, match=r"^p\.yaml: z: Extra inputs are not permitted$"):
        validate_model(Point, {"x": 3, "z": 1}, "p.yaml")


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = main(args)
    return code, capsys.readouterr().err


def test_cli_yaml_syntax_error_and_missing_file(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("merge_method: linear\nmodels: [a, b\n")
    code, err = run_cli(["merge", str(path), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "YAML syntax error at line" in err
    code, err = run_cli(
        ["merge", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "o")], capsys
    )
    assert code == 2 and "does not exist" in err
