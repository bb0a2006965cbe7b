"""`evomerge status RUN_DIR [--json] [--watch [--interval S] [--window S]]`: progress, best
fitness, best recipe summary; `--watch` redraws a live view (evomerge/status_view.py) until the
study finishes or Ctrl-C, reading the run directory without locking it."""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a run directory")
    p.add_argument("--json", action="store_true", help="one JSON object for scripts")
    p.add_argument(
        "--watch",
        action="store_true",
        help="redraw a live view until the study finishes or Ctrl-C (plain lines when not a "
        "terminal); works from any host that shares the run directory",
    )
    p.add_argument(
        "--interval", type=float, default=2.0, metavar="S", help="seconds between redraws (2)"
    )
    p.add_argument(
        "--window",
        type=float,
        default=300.0,
        metavar="S",
        help="throughput and ETA are measured over the last S seconds (300)",
    )


def summarize(run_dir: str) -> dict:
    """Counts are of distinct trials (RunStore.read_trials), never of lines; trials_completed
    counts candidates, the unit of the budget."""
    from evomerge.run_lock import lock_holder
    from evomerge.runstore import RunStore, best_trial, candidates_done, parent_items
    from evomerge.yaml_io import read_yaml

    store = RunStore.open(run_dir)
    study = read_yaml(store.dir / "study.yaml")
    records = store.read_trials()
    state = store.state().get("state")
    best = best_trial(records)
    seconds = [r.seconds.get("total", 0.0) for r in records if r.status != "duplicate"]
    out = {
        "name": study.get("name"),
        "state": state,
        "trials_completed": candidates_done(records),
        "budget": study.get("budget", {}).get("max_trials"),
        "failed": sum(1 for r in records if r.status == "failed"),
        "duplicates": sum(1 for r in records if r.status == "duplicate"),
        "seconds_per_trial": round(sum(seconds) / len(seconds), 3) if seconds else None,
        # items of the parents' rows (racing with irt; no candidates, but in budget.max_items)
        "parent_items": parent_items(store.dir),
        "best": None,
        "run_dir": str(store.dir),
    }
    from evomerge.memory_measure import plan_vs_measured

    memory = plan_vs_measured(store.dir, records)  # planned vs measured bytes per device
    if memory is not None:
        out["memory"] = memory
    holder = lock_holder(store.dir) if state == "running" else None
    if holder:
        out["controller"] = {"host": holder.get("host"), "pid": holder.get("pid")}
    if best is not None:
        out["best"] = {
            "trial": best.trial,
            "fitness": best.fitness[0] if len(best.fitness) == 1 else best.fitness,
            "scores": best.scores,
        }
        recipe_path = store.dir / "best" / "recipe.yaml"
        if recipe_path.exists():
            recipe = read_yaml(recipe_path)
            methods: dict[str, int] = {}
            for s in recipe.get("sections", []):
                methods[s["method"]] = methods.get(s["method"], 0) + 1
            out["best"]["methods"] = methods
            out["best"]["recipe"] = str(recipe_path)
    return out


def run(args: argparse.Namespace) -> int:
    if args.watch:
        return _watch(args)
    info = summarize(args.run_dir)
    if args.json:
        print(json.dumps(info, sort_keys=True))
        return 0
    who = info.get("controller")
    state = f"{info['state']} (process {who['pid']} on {who['host']})" if who else info["state"]
    print(
        f"{info['name']}: {state}, {info['trials_completed']}/{info['budget']} trials "
        f"({info['failed']} failed, {info['duplicates']} duplicates), {info['seconds_per_trial']} s per trial"
    )
    if "memory" in info:
        from evomerge.memory_measure import describe_plan_vs_measured

        print(describe_plan_vs_measured(info["memory"]))
    best = info["best"]
    if best is None:
        print("no successful trial yet")
        return 0
    fit = best["fitness"]
    fit_s = f"{fit:.4f}" if isinstance(fit, float) else str(fit)
    print(f"best: trial {best['trial']}, fitness {fit_s}")
    for task, metrics in best["scores"].items():
        print(f"  {task}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    if "methods" in best:
        print("  sections by method: " + ", ".join(f"{k} x{v}" for k, v in best["methods"].items()))
        print(f"  recipe: {best['recipe']}")
    return 0


def _watch(args: argparse.Namespace) -> int:
    from evomerge.errors import ConfigError
    from evomerge.status_view import watch

    if args.json:
        raise ConfigError("--watch draws a live view and --json prints one object: pick one")
    if args.interval <= 0 or args.window <= 0:
        raise ConfigError(
            f"--interval {args.interval} and --window {args.window} must be positive seconds"
        )
    return watch(args.run_dir, interval=args.interval, window=args.window)
