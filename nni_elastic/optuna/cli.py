"""``nni-elastic tune`` and ``nni-elastic search``: the Optuna studies on the command line.

Registered by ``nni_elastic.cli`` with ``add_parser(subparsers, [common])``; Optuna is imported
only when one of these commands runs.

    nni-elastic tune strategies/prune_and_grow/digits.yaml --trials 20 --objectives accuracy,macs \
        --storage sqlite:///runs/pg.db --study-name pg-digits
    nni-elastic search runs/best/elastic.pt --data digits --max-macs 0.5 --trials 200 --export runs/subnet
"""
from __future__ import annotations

import argparse
from typing import Any, Optional, Sequence
from ..config import parse_overrides

__all__ = ["add_parser", "cmd_tune", "cmd_search"]


def _pruner(text: str) -> Optional[str]:
    return None if text == "none" else text


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def cmd_tune(args: argparse.Namespace) -> int:
    from . import tune

    study = tune(
        args.recipe, args.trials, search_space=args.search_space, storage=args.storage, study_name=args.study_name,
        objectives=args.objectives, metric=args.metric, sampler=args.sampler, pruner=_pruner(args.pruner),
        output_dir=args.out, overrides=parse_overrides(args.set), workers=args.workers, timeout=args.timeout,
        seed=args.seed, quiet=args.quiet, fail_running=args.fail_running,
    )
    if args.quiet:
        return 0
    objectives = study.user_attrs.get("objectives", ["value"])
    best = study.best_trials
    print(f"study {study.study_name}: {len(study.trials)} trials; "
          f"{'Pareto front' if len(objectives) > 1 else 'best trial'} ({', '.join(objectives)}):")
    for t in best:
        values = ", ".join(f"{o}={_fmt(v)}" for o, v in zip(objectives, t.values))
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in t.params.items())
        print(f"  trial {t.number}: {values} | {params} | {t.user_attrs.get('checkpoint')}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from . import search_subnets

    result = search_subnets(
        args.checkpoint, data=args.data, data_root=args.data_root, search_space=args.search_space,
        max_macs=args.max_macs, max_latency_ms=args.max_latency_ms, n_trials=args.trials, objectives=args.objectives,
        storage=args.storage, study_name=args.study_name, sampler=args.sampler, seed=args.seed,
        calibrate_batches=args.calibrate_batches, device=args.device, export_dir=args.export, quiet=args.quiet,
        trust=args.trust_checkpoint,
    )
    if args.quiet:
        return 0
    from ..reporting import print_table

    def rows(items: list) -> list:
        return [{"level": ",".join(_fmt(w) for w in r["widths"].values()), "macs": r["macs"],
                 "macs_ratio": r["macs"] / result.full_macs, "params": r["params"], "latency_ms": r["latency_ms"],
                 "accuracy": r["accuracy"]} for r in items]

    stages = "/".join(result.front[0]["widths"]) if result.front else "stages"
    print_table(rows(result.uniform), f"uniform widths ({stages})")
    print_table(rows(result.front), f"Pareto front within the budget ({stages}); "
                                    f"{result.trial_seconds or 0:.2f} s per evaluated trial")
    if result.best is None:
        print("no configuration within the budget was found")
    else:
        print(f"best within budget: widths {result.best['widths']}, accuracy {result.best['accuracy']:.4f}, "
              f"{result.best['macs'] / result.full_macs:.1%} MACs")
    return 0


def _has_option(parents: Sequence[argparse.ArgumentParser], option: str) -> bool:
    return any(option in p._option_string_actions for p in parents)


def add_parser(subparsers: Any, parents: Sequence[argparse.ArgumentParser] = ()) -> None:
    """Add the ``tune`` and ``search`` subcommands (``func`` = :func:`cmd_tune` / :func:`cmd_search`)."""
    parents = list(parents)
    t = subparsers.add_parser("tune", parents=parents, help="tune a recipe's thresholds with an Optuna study")
    t.add_argument("recipe", help="a YAML recipe, e.g. strategies/prune_and_grow/digits.yaml")
    t.add_argument("--trials", type=int, default=20, help="trials to run now (added to a resumed study)")
    t.add_argument("--storage", default=None, help="sqlite:///runs/<study>.db (default), an RDB URL, or a journal file "
                                                   "(journal:///runs/x.log or *.log)")
    t.add_argument("--study-name", default=None, help="default: <method>_<recipe stem>")
    t.add_argument("--objectives", default="accuracy", help="comma-separated: accuracy, macs, params, latency")
    t.add_argument("--metric", default="mean", choices=("mean", "largest", "smallest"),
                   help="levels the objectives summarise")
    t.add_argument("--sampler", default=None, choices=("tpe", "nsga2", "random"),
                   help="default: tpe for one objective, nsga2 for several")
    t.add_argument("--pruner", default="auto", choices=("auto", "median", "hyperband", "none"),
                   help="auto: median for one objective, none for several")
    t.add_argument("--workers", type=int, default=1, help="worker processes on one storage")
    t.add_argument("--out", default=None, help="trial outputs and plots (default runs/optuna/<study>)")
    t.add_argument("--search-space", default=None, help="NNI search space JSON (default search_spaces/<method>_<stem>.json)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe override for every trial (pins the key), e.g. data.limit=200")
    t.add_argument("--timeout", type=float, default=None, help="stop starting trials after this many seconds")
    t.add_argument("--seed", type=int, default=None, help="seed of the sampler")
    t.add_argument("--fail-running", action="store_true",
                   help="mark trials left RUNNING by a killed run as FAIL first (journal storages; no other worker running)")
    t.set_defaults(func=cmd_tune)

    s = subparsers.add_parser("search", parents=parents, help="search per-stage widths of a trained elastic model")
    s.add_argument("checkpoint", help="an elastic checkpoint (elastic.pt)")
    s.add_argument("--trust-checkpoint", action="store_true",
                   help="unpickle a model stored pickled in the checkpoint (a class outside the zoo): this runs code "
                        "from the file, so only for files you wrote yourself")
    s.add_argument("--data", default=None, help="dataset (default: the checkpoint's, else digits)")
    s.add_argument("--data-root", default=None, help="dataset directory (default: the checkpoint recipe's)")
    s.add_argument("--max-macs", type=float, default=None, help="budget: fraction of the full MACs if <= 1, else MACs")
    s.add_argument("--max-latency-ms", type=float, default=None, help="budget: latency of the export on this device")
    s.add_argument("--trials", type=int, default=200, help="configurations to evaluate (>= 1)")
    s.add_argument("--objectives", default="accuracy,macs", help="comma-separated: accuracy, macs, params, latency")
    s.add_argument("--storage", default=None, help="default: in memory; or sqlite:///..., journal:///...")
    s.add_argument("--study-name", default=None)
    s.add_argument("--search-space", default=None, help="per-stage width choices (default search_spaces/subnet_search.json)")
    s.add_argument("--sampler", default=None, choices=("tpe", "nsga2", "random"))
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--calibrate-batches", type=int, default=10, help="training batches for BatchNorm recalibration")
    s.add_argument("--device", default="auto")
    s.add_argument("--export", default=None, metavar="DIR",
                   help="write the best subnet (subnet.ts, subnet.state.pt, subnet.json) and plots")
    s.set_defaults(func=cmd_search)
    for p in (t, s):
        if not _has_option(parents, "--quiet"):
            p.add_argument("--quiet", action="store_true", help="no progress bars or tables")
