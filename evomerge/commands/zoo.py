"""`evomerge zoo --out DIR [--small] [--force]`: build the demo model zoo and its study.yaml.

Trains (CPU, seeded, deterministic) a tiny Llama base and one fine-tune per skill into DIR,
reuses DIR when it was built with the same settings, and writes DIR/study.yaml.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="directory for the zoo (created; reused if built)")
    p.add_argument(
        "--small",
        action="store_true",
        help="the small zoo: builds in well under a minute, a weaker merge problem (tests)",
    )
    p.add_argument(
        "--force", action="store_true", help="rebuild even when DIR holds a zoo with these settings"
    )
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from evomerge.zoo import build_zoo

    info = build_zoo(Path(args.out), small=args.small, progress=not args.quiet, force=args.force)
    state = "built" if info.rebuilt else "reused"
    print(f"zoo {state} in {info.root} (build {info.build_hash})")
    print(f"  base:    {info.base}")
    for name, path in info.sources.items():
        print(f"  {name + ':':<8} {path}")
    print(f"  tasks:   {info.evals}")
    print(f"  study:   {info.study}")
    print(f"next: evomerge run {info.study}")
    return 0
