"""The one dtype table: consistent with torch and with safetensors' own header codes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from evomerge import dtypes


def header_code(dtype: torch.dtype, tmp_path) -> str:
    path = tmp_path / "t.safetensors"
    save_file({"x": torch.zeros(2, dtype=dtype)}, str(path))
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n])["x"]["dtype"]


@pytest.mark.parametrize("name", sorted(dtypes.SAFETENSORS))
def test_codes_are_what_safetensors_writes(name, tmp_path):
    dtype = getattr(torch, name)
    assert (
        dtypes.safetensors_code(dtype) == header_code(dtype, tmp_path) == dtypes.SAFETENSORS[name]
    )
    assert dtypes.from_safetensors(dtypes.SAFETENSORS[name]) == name


def test_aliases_name_torch_float_dtypes_and_choices_are_aliases():
    for alias, name in dtypes.ALIASES.items():
        assert getattr(torch, name).is_floating_point, alias
        assert name in dtypes.FLOATS
    assert set(dtypes.CHOICES) <= set(dtypes.ALIASES)
    assert dtypes.from_safetensors("NOPE") is None


def test_importing_the_table_does_not_import_torch():
    code = "import sys, evomerge.dtypes; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
