"""`evomerge bench`: merge, scoring and worker throughput on this hardware, with references."""

from __future__ import annotations

import argparse
import json

PARTS = ("merge", "scoring", "workers", "fidelity", "residency", "controller")
DEFAULT_PARTS = ("merge", "scoring", "workers")  # fidelity runs studies: minutes to hours


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--parts",
        default=",".join(DEFAULT_PARTS),
        help=f"comma-separated subset of {', '.join(PARTS)} (default: {','.join(DEFAULT_PARTS)})",
    )
    p.add_argument(
        "--size",
        choices=["0.4b", "tiny"],
        default="0.4b",
        help="merge part: model size (default: 0.4b, as in the issue)",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda (default: cuda when available)")
    p.add_argument(
        "--work-dir", default="runs/bench", help="where bench models and outputs live (reused)"
    )
    p.add_argument("--no-mergekit", action="store_true", help="skip the mergekit-yaml reference")
    p.add_argument(
        "--candidates",
        type=int,
        default=6,
        help="scoring/workers parts: candidates per measurement",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="merge, residency parts: runs per tool, config or tier, best reported (default: 2)",
    )
    p.add_argument("--seeds", default="0,1,2", help="fidelity part: study seeds (default: 0,1,2)")
    p.add_argument(
        "--trials",
        type=int,
        default=240,
        help="fidelity part: the item budget is what this many full-fidelity candidates score on the zoo's 48-item split",
    )
    p.add_argument(
        "--estimate-candidates",
        type=int,
        default=100,
        help="fidelity part: random candidates for the estimators' Spearman (0: skip)",
    )
    p.add_argument(
        "--controller-trials",
        type=int,
        default=2000,
        help="controller part: trials per optimizer (default: 2000)",
    )
    p.add_argument(
        "--controller-workers",
        type=int,
        default=8,
        help="controller part: simulated workers (default: 8)",
    )
    p.add_argument(
        "--optimizers",
        default="",
        help="controller part: comma-separated optimizers (default: every registered one)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from evomerge.errors import ConfigError
    from evomerge.worker import resolve_device

    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    bad = [p for p in parts if p not in PARTS]
    if bad:
        raise ConfigError(f"--parts: unknown part {bad[0]!r} (choose from {', '.join(PARTS)})")
    device = resolve_device(args.device)
    work = Path(args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    report: dict[str, object] = {"device": device}
    if "merge" in parts:
        from evomerge.bench.merge_bench import run_merge_bench

        report["merge"] = run_merge_bench(
            work / "merge",
            size=args.size,
            device=device,
            mergekit=not args.no_mergekit,
            repeats=args.repeats,
        )
        if not args.json:
            print_merge(report["merge"])
    if "scoring" in parts:
        from evomerge.bench.scoring_bench import run_scoring_bench

        report["scoring"] = run_scoring_bench(
            work / "zoo", device=device, candidates=args.candidates
        )
        if not args.json:
            print_table("scoring (per candidate, demo zoo tasks)", report["scoring"])
    if "workers" in parts:
        from evomerge.bench.workers_bench import run_workers_bench

        report["workers"] = run_workers_bench(
            work / "zoo", device=device, candidates=args.candidates
        )
        if not args.json:
            print_table("workers (candidates per minute)", report["workers"])
    if "fidelity" in parts:
        from evomerge.bench.fidelity_bench import run_fidelity_bench

        seeds = tuple(int(s) for s in args.seeds.split(",") if s.strip())
        report["fidelity"] = run_fidelity_bench(
            work / "zoo",
            work / "fidelity",
            seeds=seeds,
            trials=args.trials,
            estimate_candidates=args.estimate_candidates,
        )
        if not args.json:
            print_fidelity(report["fidelity"])
    if "residency" in parts:
        from evomerge.bench.residency_bench import print_residency, run_residency_bench

        report["residency"] = run_residency_bench(  # the merge part's models, and a third
            work / "merge", size=args.size, device=device, repeats=args.repeats
        )
        if not args.json:
            print_residency(report["residency"])
    if "controller" in parts:
        from evomerge.bench.controller_bench import print_controller, run_controller_bench

        names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
        report["controller"] = run_controller_bench(
            work / "controller",
            optimizers=names or None,
            trials=args.controller_trials,
            workers=args.controller_workers,
        )
        if not args.json:
            print_controller(report["controller"])
    if args.json:
        print(json.dumps(report, sort_keys=True))
    return 0


def print_fidelity(f: dict) -> None:
    print(
        f"fidelity (demo zoo; item budget = {f['trials_budget']} full-fidelity candidates on the "
        "48-item split)"
    )
    print(f"{'setting':<14}{'held-out mean per seed':>28}{'avg':>8}{'items':>26}")
    for name, row in f["search"].items():
        means = " ".join(f"{v:.3f}" for v in row["heldout_mean"])
        items = " ".join(str(v) for v in row["items"])
        print(f"{name:<14}{means:>28}{row['heldout_mean_avg']:>8.3f}{items:>26}")
        if "items_to_match_full" in row:
            shares = " ".join(
                "never" if v is None else f"{100 * v:.0f}%" for v in row["items_to_match_full"]
            )
            print(f"{'':<14}reached full's held-out mean with {shares} of full's items")
    if "estimates" in f:
        e = f["estimates"]
        print(
            f"Spearman at {e['quarter_items']}/{e['all_items']} items over {e['candidates']} "
            f"random candidates: mean {e['spearman_mean']}, irt {e['spearman_irt']}"
            + (
                f", irt with the parents {e['spearman_irt_parents']}"
                if "spearman_irt_parents" in e
                else ""
            )
        )


def print_merge(m: dict) -> None:
    print(
        f"merge: random Llama, {m['params'] / 1e9:.2f}B parameters, bf16, base + 2 fine-tunes, device {m['device']}"
    )
    print(f"{'method':<10}{'evomerge s':>12}{'mergekit s':>12}{'speedup':>10}   (best of runs)")
    for name, row in m["methods"].items():
        print(
            f"{name:<10}{row['evomerge_s']:>12.2f}{row.get('mergekit_s', float('nan')):>12.2f}{row.get('speedup', float('nan')):>9.2f}x"
        )
    for key, label in (
        ("in_memory_linear", "linear, 2 models"),
        ("in_memory_task_arithmetic", "task arithmetic, base + 2"),
    ):
        mem = m[key]
        print(
            f"in-memory merge ({label}): {mem['seconds']:.3f} s, {mem['gbps']:.2f} GB/s; "
            f"memory copy {mem['copy_gbps']:.2f} GB/s -> {100 * mem['fraction_of_copy']:.0f}% of copy"
        )


def print_table(title: str, rows: dict) -> None:
    print(title)
    for key, value in rows.items():
        print(f"  {key:<36} {value}")
