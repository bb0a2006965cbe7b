"""One dtype table: the names users write, torch's names, and safetensors' header codes.

Pure Python (no torch import), so the CLI can offer the names without loading torch;
`checkpoint.parse_dtype` turns a name into a torch dtype.
"""

from __future__ import annotations

# what users may write (recipes, study configs, --dtype) -> torch's name
ALIASES: dict[str, str] = {
    "float32": "float32",
    "fp32": "float32",
    "float16": "float16",
    "fp16": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float64": "float64",
}
# the output dtypes offered by the CLI and named in error messages
CHOICES: tuple[str, ...] = ("float32", "bfloat16", "float16")
# torch's name -> safetensors header code
SAFETENSORS: dict[str, str] = {
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "float64": "F64",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
}
FLOATS: frozenset[str] = frozenset({"float32", "float16", "bfloat16", "float64"})
_FROM_SAFETENSORS = {code: name for name, code in SAFETENSORS.items()}


def torch_name(dtype: object) -> str:
    """'float32' for torch.float32 (any object whose str() is 'torch.<name>')."""
    return str(dtype).removeprefix("torch.")


def safetensors_code(dtype: object) -> str:
    """The header code of a torch dtype: torch.bfloat16 -> 'BF16' (KeyError if unsupported)."""
    return SAFETENSORS[torch_name(dtype)]


def from_safetensors(code: str) -> str | None:
    """torch's name of a header code ('BF16' -> 'bfloat16'), None if unknown."""
    return _FROM_SAFETENSORS.get(code)
