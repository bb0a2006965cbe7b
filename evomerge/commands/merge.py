"""`evomerge merge RECIPE.yaml --out DIR`: one merge, streamed to disk."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="our recipe YAML (evomerge_recipe: 1) or a mergekit merge YAML")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument(
        "--dtype",
        default=None,
        help="output dtype: float32, bfloat16 or float16 (default: the recipe's, else the sources')",
    )
    p.add_argument(
        "--max-shard-size",
        default="5GB",
        help="largest safetensors shard, e.g. 2GB or 500MB (default: 5GB)",
    )
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="load pickled .bin/.pt checkpoints (they can run code)",
    )
    p.add_argument("--force", action="store_true", help="replace a non-empty --out folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def parse_size(text: str) -> int:
    from evomerge.errors import ConfigError

    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "K": 10**3, "M": 10**6, "G": 10**9, "B": 1}
    t = text.strip().upper()
    for u in sorted(units, key=len, reverse=True):
        if t.endswith(u):
            num = t[: -len(u)]
            try:
                return int(float(num) * units[u])
            except ValueError:
                break
    try:
        return int(t)
    except ValueError:
        raise ConfigError(
            f"--max-shard-size: cannot read {text!r} (examples: 5GB, 500MB, 1000000)"
        ) from None


def run(args: argparse.Namespace) -> int:
    from evomerge.merge import MergeSettings, merge_to_disk
    from evomerge.recipe_loader import load_recipe_file

    recipe = load_recipe_file(args.recipe)
    settings = MergeSettings(
        out_dir=args.out,
        device=args.device,
        dtype=args.dtype,
        max_shard_bytes=parse_size(args.max_shard_size),
        allow_pickle=args.allow_pickle,
        overwrite=args.force,
        progress=not args.quiet,
    )
    stats = merge_to_disk(recipe, settings)
    gb = stats.bytes_written / 1e9
    print(
        f"merged {stats.tensors} tensors ({gb:.3f} GB) into {stats.out_dir} in {stats.seconds:.2f} s"
    )
    return 0
