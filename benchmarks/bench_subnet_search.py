"""Subnet search on shared weights: per-stage widths under a MACs budget versus the uniform-width levels.

Trains an elastic ResNet-20 with prune-and-grow (the recipe for ``--data``: ``digits.yaml`` or
``<data>_resnet20.yaml``), or loads ``--checkpoint``, then runs :func:`nni_elastic.optuna.search_subnets`
(per-stage widths from ``search_spaces/subnet_search.json``, BatchNorm recalibrated on 10 training
batches, no training) under ``--max-macs``. Prints the time per trial on this device, the levels
(per-level BatchNorm, as trained) and the found Pareto front (accuracy vs MACs, validation split;
the search selects on it too, so the test split, where the dataset has one, gives the unbiased
comparison), and writes JSON.

    python benchmarks/bench_subnet_search.py                       # digits, max 50 % MACs, 200 trials
    python benchmarks/bench_subnet_search.py --checkpoint runs/prune_and_grow/digits/elastic.pt
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _recipe_for(data: str) -> Path:
    name = "digits.yaml" if data == "digits" else f"{data}_resnet20.yaml"
    return ROOT / "strategies" / "prune_and_grow" / name


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None, help="a trained elastic.pt (default: train one)")
    p.add_argument("--data", default="digits")
    p.add_argument("--data-root", default=None)
    p.add_argument("--recipe", default=None, help="recipe to train with (default: digits.yaml or <data>_resnet20.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override for training")
    p.add_argument("--train-out", default="runs/bench_subnet_search", help="training output directory")
    p.add_argument("--max-macs", type=float, default=0.5, help="budget: fraction of the full MACs")
    p.add_argument("--trials", type=int, default=200)
    p.add_argument("--sampler", default=None, choices=("tpe", "nsga2", "random"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--search-space", default=None)
    p.add_argument("--val-limit", type=int, default=None, help="search on the first N validation samples only")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "subnet_search.json"))
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)

    import nni_elastic as ne
    from nni_elastic.data import load_dataset
    from nni_elastic.optuna import search_subnets
    from nni_elastic.training import evaluate

    train_seconds = None
    checkpoint = args.checkpoint
    if checkpoint is None:
        from nni_elastic.config import load_recipe
        from nni_elastic.runner import run_recipe

        overrides = {"device": args.device, "data.name": args.data}
        if args.data_root:
            overrides["data.root"] = args.data_root
        overrides.update(dict(item.split("=", 1) for item in args.set))
        recipe = load_recipe(args.recipe or _recipe_for(args.data), overrides)
        start = time.perf_counter()
        run_recipe(recipe, output=args.train_out, quiet=args.quiet, exports=False)
        train_seconds = time.perf_counter() - start
        checkpoint = str(Path(args.train_out) / "elastic.pt")

    start = time.perf_counter()
    result = search_subnets(checkpoint, data=args.data, data_root=args.data_root, max_macs=args.max_macs,
                            n_trials=args.trials, sampler=args.sampler, seed=args.seed, device=args.device,
                            search_space=args.search_space, val_limit=args.val_limit, quiet=args.quiet)
    search_seconds = time.perf_counter() - start
    em, full = result.elastic_model, result.full_macs
    configs = len({tuple(sorted(t.user_attrs["channels"].items())) for t in result.study.trials})

    # the trained levels (their own per-level BatchNorm statistics), on the same validation split
    em_levels = ne.ElasticModel.load(checkpoint).to(args.device)
    meta = em_levels.metadata or {}
    rec_data = (meta.get("recipe") or {}).get("data") or {}
    splits = load_dataset(args.data, root=args.data_root or rec_data.get("root"), val_fraction=rec_data.get("val_fraction", 0.2),
                          seed=rec_data.get("seed", 0), image_size=rec_data.get("image_size"))
    val = splits.val if args.val_limit is None else torch.utils.data.Subset(splits.val, range(min(args.val_limit, len(splits.val))))
    levels = []
    for lv in em_levels.levels:
        with em_levels.use_level(lv.index):
            row = {"width": lv.width, "macs": lv.macs, "macs_ratio": lv.macs / full,
                   "accuracy": evaluate(em_levels, val, device=args.device)["accuracy"]}
            if splits.test is not None:
                row["test_accuracy"] = evaluate(em_levels, splits.test, device=args.device)["accuracy"]
        levels.append(row)
    cap = args.max_macs * full if args.max_macs <= 1 else args.max_macs
    fitting = [lv for lv in levels if lv["macs"] <= cap]
    best_level = max(fitting, key=lambda r: r["accuracy"]) if fitting else None
    best = result.best
    if best is not None and splits.test is not None:  # the elastic model is left at best, BN recalibrated
        best["test_accuracy"] = evaluate(em, splits.test, device=args.device)["accuracy"]

    device = f"{args.device} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    print(f"subnet search: {Path(checkpoint)} on {args.data}, budget {_pct(cap / full)} of {full / 1e6:.3f}M MACs, "
          f"{args.trials} trials on {device}")
    print(f"time: {search_seconds:.1f} s total, {search_seconds / args.trials * 1000:.0f} ms per trial "
          f"(sampler + cache hits included), {(result.trial_seconds or 0) * 1000:.0f} ms per trial with new work; "
          f"{configs} distinct configurations of {len(result.study.trials)} trials")
    print("\ntrained uniform-width levels (per-level BatchNorm):")
    print("| width | MACs | accuracy (val) |" + (" accuracy (test) |" if splits.test is not None else ""))
    for lv in levels:
        print(f"| {lv['width']} | {_pct(lv['macs_ratio'])} | {_pct(lv['accuracy'])} |"
              + (f" {_pct(lv['test_accuracy'])} |" if "test_accuracy" in lv else ""))
    print("\nPareto front within the budget (widths conv1/layer1/layer2/layer3, recalibrated BatchNorm):")
    print("| widths | MACs | params | accuracy (val) |")
    for r in result.front:
        print(f"| {'/'.join(f'{w:g}' for w in r['widths'].values())} | {_pct(r['macs'] / full)} | "
              f"{r['params'] / 1e3:.1f}k | {_pct(r['accuracy'])} |")
    if best is not None and best_level is not None:
        print(f"\nbest within budget: {best['widths']} {_pct(best['accuracy'])} at {_pct(best['macs'] / full)} MACs "
              f"vs the best level within budget (width {best_level['width']}) {_pct(best_level['accuracy'])} at "
              f"{_pct(best_level['macs_ratio'])} MACs: {100 * (best['accuracy'] - best_level['accuracy']):+.2f} pp"
              + (f"; test {_pct(best['test_accuracy'])} vs {_pct(best_level['test_accuracy'])}"
                 if "test_accuracy" in best else ""))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "checkpoint": str(checkpoint), "data": args.data, "val_limit": args.val_limit, "device": device, "max_macs": args.max_macs,
        "full_macs": full, "trials": args.trials, "sampler": args.sampler or "default (nsga2)",
        "train_seconds": train_seconds, "search_seconds": search_seconds,
        "ms_per_trial": search_seconds / args.trials * 1000, "ms_per_new_trial": (result.trial_seconds or 0) * 1000,
        "distinct_configs": configs, "levels": levels, "front": result.front, "best": best, "best_level": best_level,
        "torch": torch.__version__, "python": sys.version.split()[0],
    }, indent=2, default=str) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
