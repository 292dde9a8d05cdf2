"""Prune-and-grow on the accuracy-vs-compute frontier: budget levels vs independently trained twins, over seeds.

For each model and seed:

1. prune-and-grow pretrains the full network for ``--epochs`` epochs, then builds levels for
   ``--levels`` (``macs:0.1,0.25,0.4,1.0``: per-group widths chosen for MACs budgets; or
   ``widths:0.25,0.5,0.75,1.0``: uniform), prunes and grows them (``--grow-mode``);
2. ``--extra`` more levels are added after training with ``ElasticModel.add_level`` (channels
   between two trained levels, BatchNorm calibrated; no training), so the model ships
   ``len(levels) + extra`` operating points for the same training compute;
3. every trained level's architecture (its export, re-initialised as the model zoo initialises a
   network: ``--twin-init model``) is trained from scratch for ``--epochs`` epochs: its "twin";
4. with ``--search N``, for each added point the best of N random nested configurations of its gap
   within its MACs (validation split, BatchNorm recalibrated): a "searched subnet";
5. each level's test accuracy, MACs, deployed latency (batch ``--latency-batch``) and the
   training compute (MACs x samples, in units of one full training) are recorded.

The table gives mean and standard deviation over seeds; results go to JSON after every seed
(``--resume`` skips finished seeds) and to a plot of accuracy vs MACs and vs latency.

Targets (issue 13): a level within 1 pp of the full twin at <= 40 % of its MACs; every level >=
its twin - 0.3 pp in the mean, the smallest >= its twin; compute <= 1.5x one full training.

    python benchmarks/bench_frontier.py --models resnet20,mobilenetv2_tiny,vgg16_bn:width_multiplier=0.25 \
        --seeds 0,1,2 --limit 6000 --epochs 8
"""
from __future__ import annotations

import argparse
import fcntl
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

import nni_elastic as ne
from nni_elastic.budget import parse_levels
from nni_elastic.device import resolve_device
from nni_elastic.models._layers import init_weights
from nni_elastic.strategies._base import first_batches
from nni_elastic.training import TrainConfig, evaluate, train
from torch.utils.data import Subset

from bench_expansion import reinit  # noqa: E402  (benchmarks/ is the script's directory)


def parse_spec(text: str) -> dict[str, Any]:
    kind, _, values = text.partition(":")
    return parse_levels({kind: [float(v) for v in values.split(",")]}, where="--levels").to_dict()


def between(lo: dict[str, int], hi: dict[str, int], t: float) -> dict[str, int]:
    return {g: int(round(lo[g] + (hi[g] - lo[g]) * t)) for g in lo}


def extra_levels(em: ne.ElasticModel, count: int) -> list[dict[str, int]]:
    """``count`` channel plans between consecutive trained levels (largest gaps first), nested by construction."""
    chans = [lv.channels for lv in em.levels]
    gaps = [[i, 1] for i in range(len(chans) - 1)]  # [gap index, parts]
    for _ in range(count):
        ratio = [(em.levels[i + 1].macs / em.levels[i].macs) ** (1 / parts) for i, parts in gaps]
        gaps[max(range(len(gaps)), key=lambda j: ratio[j])][1] += 1
    out = []
    for i, parts in gaps:
        for p in range(1, parts):
            out.append(between(chans[i], chans[i + 1], p / parts))
    return out


def search_between(em: ne.ElasticModel, lo: dict[str, int], hi: dict[str, int], start: dict[str, int], trials: int,
                   seed: int, evaluator: Any) -> tuple[dict[str, int], float, float]:
    """Random search on the shared weights for the best nested configuration between two levels.

    Each trial draws, per channel group, a point between the two levels (fractions 0, 1/4, ..., 1
    of the gap); configurations above the MACs of ``start`` (the uniform added point) are redrawn
    (up to 20 times). Every candidate's BatchNorm statistics are recalibrated and it is scored on
    the validation split; ``start`` is the first candidate, so the search is never worse than it on
    validation. Returns (channels, its validation accuracy, ``start``'s validation accuracy).
    """
    cap = em.count(start)[0]
    g = torch.Generator().manual_seed(seed)
    start_acc = evaluator.evaluate(start)
    best, best_acc = start, start_acc
    for _ in range(trials):
        for _ in range(20):
            chans = {k: int(round(lo[k] + (hi[k] - lo[k]) * int(torch.randint(5, (1,), generator=g)) / 4)) for k in lo}
            if chans not in (lo, hi) and em.count(chans)[0] <= cap:
                break
        else:
            continue
        acc = evaluator.evaluate(chans)
        if acc > best_acc:
            best, best_acc = chans, acc
    em.set_level(-1)
    return best, best_acc, start_acc


class _Stop(Exception):
    pass


def build_model(spec: str, splits: Any) -> torch.nn.Module:
    """``name`` or ``name:key=value:...`` (e.g. ``vgg16_bn:width_multiplier=0.25``), for the data's classes and channels."""
    name, *pairs = spec.split(":")
    kwargs: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--models: {pair!r} in {spec!r} is not key=value (e.g. vgg16_bn:width_multiplier=0.25)")
        try:
            kwargs[key] = json.loads(value)  # numbers, true/false, lists
        except ValueError:
            kwargs[key] = value  # a plain string
    return ne.create_model(name, num_classes=splits.num_classes, in_channels=splits.in_channels, **kwargs)


def twin_key(model_name: str, seed: int, channels: dict[str, int], args: argparse.Namespace) -> str:
    """What decides a twin's accuracy: architecture, seed (init and data order), data, training settings and
    the initialisation (``reset`` keys keep their older form, so the cache's earlier entries stay found)."""
    key = [model_name, seed, args.data, args.limit, args.epochs, args.lr, args.batch_size, sorted(channels.items())]
    return json.dumps(key if args.twin_init == "reset" else key + [f"init={args.twin_init}"])


def init_twin(twin: torch.nn.Module, seed: int, init: str) -> torch.nn.Module:
    """A twin's starting weights: ``model`` is the model zoo's own initialisation (Kaiming-normal convolutions,
    BatchNorm 1/0, as ``create_model`` initialises the full network); ``reset`` is PyTorch's per-layer default."""
    reinit(twin, seed)
    if init == "model":
        init_weights(twin)
    return twin


def load_twins(path: Path) -> dict[str, dict]:
    return json.loads(path.read_text()) if path.is_file() else {}


def store_twin(path: Path, key: str, row: dict) -> None:
    """Add one twin to the cache: re-read and replaced under a lock, as several processes may share the file."""
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cache = load_twins(path)
        cache[key] = row
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(cache, indent=1))
        tmp.replace(path)


def twin_accuracy(model_name: str, seed: int, em: ne.ElasticModel, channels: dict[str, int], args: argparse.Namespace,
                  splits: Any, test: Any, device: torch.device) -> dict:
    """The architecture of ``channels`` (an ``em`` level) trained from scratch for ``--epochs`` (same data and order),
    from the cache if there."""
    key = twin_key(model_name, seed, channels, args)
    cache = Path(args.twin_cache) if args.twin_cache else None
    cached = load_twins(cache).get(key) if cache is not None else None
    if cached is not None:
        return cached
    cfg = TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=seed)
    twin = init_twin(em.export(channels), seed, args.twin_init)
    t0 = time.time()
    train(twin, splits.train, None, cfg, device=device, quiet=args.quiet, desc="twin")
    row = {"twin_accuracy": evaluate(twin, test, device=device)["accuracy"], "twin_seconds": time.time() - t0}
    if cache is not None:
        store_twin(cache, key, row)
    return row


def twins_from(args: argparse.Namespace, device: torch.device) -> int:
    """Train the twins of every trained level stored in ``--twins-from`` result files into the cache (no elastic
    runs): each architecture is rebuilt from its channel counts, initialised by ``--twin-init``; data and training
    settings are the file's."""
    for path in args.twins_from.split(","):
        data = json.loads(Path(path).read_text())
        stored = {k: data["args"][k] for k in ("data", "data_root", "limit", "epochs", "lr", "batch_size")}
        run_args = argparse.Namespace(**{**vars(args), **stored})
        for name, entry in data["results"].items():
            if name not in args.models.split(","):
                continue
            for run in entry["runs"]:
                seed = run["seed"]
                splits = ne.data.load_dataset(run_args.data, root=run_args.data_root, limit=run_args.limit, seed=seed)
                test = splits.test if splits.test is not None else splits.val
                em = ne.ElasticModel(build_model(name, splits), splits.example_inputs(), widths=(1.0,))
                for i, row in enumerate(run["levels"]):
                    result = twin_accuracy(name, seed, em, row["channels"], run_args, splits, test, device)
                    print(f"  {name} seed {seed} twin {i} ({args.twin_init} init): {100 * result['twin_accuracy']:.2f} "
                          f"(stored: {100 * row['twin_accuracy']:.2f})", flush=True)
    return 0


def run_seed(model_name: str, seed: int, args: argparse.Namespace, splits: Any, test: Any, device: torch.device) -> dict:
    torch.manual_seed(seed)
    model = build_model(model_name, splits)
    spec = parse_spec(args.levels)
    level_kw = {"widths": spec["widths"]} if "widths" in spec else {"levels": spec}
    pretrain = args.epochs if args.pretrain_epochs is None else args.pretrain_epochs
    pg = ne.PruneAndGrow(**level_kw, pretrain_epochs=pretrain, prune_steps=args.prune_steps,
                         finetune_epochs=args.finetune_epochs, core_epochs=args.core_epochs, grow_epochs=args.grow_epochs,
                         final_grow_epochs=args.final_grow_epochs,
                         final_grow_levels=args.final_grow_levels, path_samples=args.path_samples, grow_lr=args.grow_lr,
                         finetune_lr=args.finetune_lr, grow_mode=args.grow_mode,
                         distill=args.distill, distill_temperature=args.distill_temperature,
                         importance=args.importance, lr=args.lr, batch_size=args.batch_size, seed=seed, device=device,
                         quiet=args.quiet)
    # the validation split only reports progress inside fit (nothing is selected on it): a part is enough
    val = Subset(splits.val, range(min(args.val_limit, len(splits.val)))) if args.val_limit else splits.val
    start = time.time()
    if args.twins_only:  # the levels' architectures are fixed at the wrap: train their twins into the cache
        def stop(info):
            if info.name == "wrap":
                raise _Stop

        pg.on_step_end = stop
        try:
            pg.fit(model, splits.train, val, example_inputs=splits.example_inputs())
        except _Stop:
            pass
        for i, lv in enumerate(pg.elastic_model_.levels):
            row = twin_accuracy(model_name, seed, pg.elastic_model_, lv.channels, args, splits, test, device)
            print(f"  {model_name} seed {seed} twin {i}: {100 * row['twin_accuracy']:.2f}", flush=True)
        return {}
    em = pg.fit(model, splits.train, val, example_inputs=splits.example_inputs()).elastic_model
    seconds = time.time() - start
    full_macs = em.levels[-1].macs
    trained = len(em.levels)
    levels = []
    for lv in em.levels:
        with em.use_level(lv.index):
            acc = evaluate(em, test, device=device)["accuracy"]
        levels.append({"channels": lv.channels, "macs": lv.macs, "macs_ratio": lv.macs / full_macs, "accuracy": acc})
    # more operating points at no training: levels between the trained ones, BatchNorm calibrated
    calibration = first_batches(splits.train, args.batch_size, 20)
    added = []
    for chans in extra_levels(em, args.extra):
        lv = em.add_level(chans, data=calibration)
        with em.use_level(lv.index):
            acc = evaluate(em, test, device=device)["accuracy"]
        added.append({"channels": lv.channels, "macs": lv.macs, "macs_ratio": lv.macs / full_macs, "accuracy": acc})
    # searched subnets: for each added point, the best of --search random nested configurations of
    # the same gap within its MACs (validation split), tested as an ad-hoc level
    searched = []
    if args.search:
        from nni_elastic.subnet import SubnetEvaluator

        val_batches = Subset(splits.val, range(min(args.val_limit or len(splits.val), len(splits.val))))
        evaluator = SubnetEvaluator(em, [x for x, _ in calibration], val_batches, device, False, 1, 1)
        test_evaluator = SubnetEvaluator(em, [x for x, _ in calibration], test, device, False, 1, 1)
        trained_chans = [r["channels"] for r in levels]
        for j, row in enumerate(added):
            i = max(k for k, c in enumerate(trained_chans) if all(c[g] <= row["channels"][g] for g in c))
            chans, val_acc, uniform_val = search_between(em, trained_chans[i], trained_chans[i + 1], row["channels"],
                                                         args.search, seed * 100 + j, evaluator)
            if chans == row["channels"]:
                searched.append({"channels": chans, "val_accuracy": val_acc, "uniform_val_accuracy": uniform_val,
                                 "is_uniform": True})  # the added point itself: its test figures below
                continue
            # evaluated as an ad-hoc level (BatchNorm calibrated as add_level does): it need not nest with the
            # uniform added points, so it is not added next to them
            acc = test_evaluator.evaluate(chans)
            macs = em.count(chans)[0]
            em.set_level(-1)
            searched.append({"channels": chans, "macs": macs, "macs_ratio": macs / full_macs, "accuracy": acc,
                             "val_accuracy": val_acc, "uniform_val_accuracy": uniform_val})
            print(f"  {model_name} seed {seed} searched {j}: MACs {macs / full_macs:.3f} (added {row['macs_ratio']:.3f}), "
                  f"test {100 * acc:.2f} vs added {100 * row['accuracy']:.2f}", flush=True)
    for row in levels + added:
        index = next(lv.index for lv in em.levels if lv.channels == row["channels"])
        row["latency_ms"] = em.measure_latency(index, batch_size=args.latency_batch, form="deploy")
    for row in searched:
        if not row.get("is_uniform"):
            row["latency_ms"] = em.measure_latency(row["channels"], batch_size=args.latency_batch, form="deploy")
    for row, point in zip(searched, added):
        if row.get("is_uniform"):
            row.update({k: point[k] for k in ("macs", "macs_ratio", "accuracy", "latency_ms")})
    # twins: each trained level's architecture (by its channels) from scratch, same epochs and data order
    for i, row in enumerate(levels):
        if args.no_twins:
            print(f"  {model_name} seed {seed} level {i}: MACs {row['macs_ratio']:.3f}, elastic {100 * row['accuracy']:.2f}",
                  flush=True)
            continue
        row.update(twin_accuracy(model_name, seed, em, row["channels"], args, splits, test, device))
        row["delta_pp"] = 100 * (row["accuracy"] - row["twin_accuracy"])
        print(f"  {model_name} seed {seed} level {i}: MACs {row['macs_ratio']:.3f}, elastic {100 * row['accuracy']:.2f}, "
              f"twin {100 * row['twin_accuracy']:.2f} ({row['delta_pp']:+.2f} pp)", flush=True)
    compute = pg.compute_["full_epochs"] / args.epochs
    return {"model": model_name, "seed": seed, "levels": levels, "added": added, "searched": searched, "trained_levels": trained,
            "compute_vs_one_full_training": compute,
            "twins_compute_vs_one_full_training": sum(r["macs_ratio"] for r in levels),
            "prune_and_grow_seconds": seconds, "steps": pg.records_["steps"], "budget": pg.records_.get("budget")}


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(runs: list[dict]) -> dict:
    n_levels = len(runs[0]["levels"])
    rows = []
    for i in range(n_levels):
        acc = mean_std([r["levels"][i]["accuracy"] for r in runs])
        twin = mean_std([r["levels"][i]["twin_accuracy"] for r in runs])
        delta = mean_std([r["levels"][i]["delta_pp"] for r in runs])
        rows.append({"level": i, "macs_ratio": statistics.fmean(r["levels"][i]["macs_ratio"] for r in runs),
                     "latency_ms": statistics.fmean(r["levels"][i]["latency_ms"] for r in runs),
                     "accuracy": acc, "twin_accuracy": twin, "delta_pp": delta})
    full_twin = rows[-1]["twin_accuracy"][0]
    within = [r for r in rows if r["accuracy"][0] >= full_twin - 0.01]
    added = []
    for j in range(len(runs[0]["added"])):
        added.append({"macs_ratio": statistics.fmean(r["added"][j]["macs_ratio"] for r in runs),
                      "latency_ms": statistics.fmean(r["added"][j]["latency_ms"] for r in runs),
                      "accuracy": mean_std([r["added"][j]["accuracy"] for r in runs])})
    searched = []
    for j in range(len(runs[0].get("searched", []))):
        searched.append({"macs_ratio": statistics.fmean(r["searched"][j]["macs_ratio"] for r in runs),
                         "latency_ms": statistics.fmean(r["searched"][j]["latency_ms"] for r in runs),
                         "accuracy": mean_std([r["searched"][j]["accuracy"] for r in runs]),
                         "gain_pp": mean_std([100 * (r["searched"][j]["accuracy"] - r["added"][j]["accuracy"]) for r in runs])})
    frontier = within + [a for a in added + searched if a["accuracy"][0] >= full_twin - 0.01]
    compute = mean_std([r["compute_vs_one_full_training"] for r in runs])
    return {
        "levels": rows, "added": added, "searched": searched, "compute": compute, "seeds": [r["seed"] for r in runs],
        "macs_cut_at_1pp": 1 - min(r["macs_ratio"] for r in within) if within else 0.0,
        "macs_cut_at_1pp_with_added": 1 - min(r["macs_ratio"] for r in frontier) if frontier else 0.0,
        "targets": {
            "frontier_1pp_at_40pct_macs": bool(within) and min(r["macs_ratio"] for r in within) <= 0.40,
            "every_level_ge_twin_minus_0.3pp": all(r["delta_pp"][0] >= -0.3 for r in rows),
            "smallest_ge_twin": rows[0]["delta_pp"][0] >= 0,
            "compute_le_1.5x": compute[0] <= 1.5,
        },
    }


def table(model_name: str, summary: dict, args: argparse.Namespace, n_train: int, n_test: int) -> str:
    schedule = ""
    if args.pretrain_epochs is not None:  # the compute split, when not the default one
        core = args.core_epochs
        schedule = (f", pretrain {args.pretrain_epochs}, finetune {args.finetune_epochs}/step"
                    f"{'' if core is None else f' (core {core})'}, grow {args.grow_epochs}, "
                    f"final grow {args.final_grow_epochs}"
                    f"{'' if args.final_grow_levels == 1 else f' (levels {args.final_grow_levels})'}, "
                    f"path samples {args.path_samples}")
        if args.distill:
            schedule += f", distill {args.distill} at T={args.distill_temperature}"
    lines = [f"### {model_name}, {args.levels}, seeds {summary['seeds']} ({n_train} train samples, {n_test} test, "
             f"{args.epochs} epochs, grow_mode={args.grow_mode}, importance={args.importance}{schedule}; "
             f"twins: {args.twin_init} init)", "",
             "| level | MACs ratio | latency ms (b{}) | elastic acc | twin acc | delta pp |".format(args.latency_batch),
             "|---|---|---|---|---|---|"]
    for r in summary["levels"]:
        lines.append(f"| {r['level']} | {r['macs_ratio']:.3f} | {r['latency_ms']:.2f} | {100 * r['accuracy'][0]:.2f} ± "
                     f"{100 * r['accuracy'][1]:.2f} | {100 * r['twin_accuracy'][0]:.2f} ± {100 * r['twin_accuracy'][1]:.2f} | "
                     f"{r['delta_pp'][0]:+.2f} ± {r['delta_pp'][1]:.2f} |")
    for a in summary["added"]:
        lines.append(f"| added | {a['macs_ratio']:.3f} | {a['latency_ms']:.2f} | {100 * a['accuracy'][0]:.2f} ± "
                     f"{100 * a['accuracy'][1]:.2f} | - | - |")
    for a in summary.get("searched", []):
        lines.append(f"| searched | {a['macs_ratio']:.3f} | {a['latency_ms']:.2f} | {100 * a['accuracy'][0]:.2f} ± "
                     f"{100 * a['accuracy'][1]:.2f} | - | {a['gain_pp'][0]:+.2f} ± {a['gain_pp'][1]:.2f} vs added |")
    t = summary["targets"]
    c = summary["compute"]
    lines += ["", f"- training compute: {c[0]:.2f} ± {c[1]:.2f}x one full training for {len(summary['levels'])} trained levels "
              f"({len(summary['levels']) + len(summary['added'])} levels with the added ones, same compute; each searched subnet "
              "is an alternative to the added point of its row, not nested with it)",
              f"- MACs cut at <= 1 pp below the full twin: {100 * summary['macs_cut_at_1pp']:.1f} % (trained levels), "
              f"{100 * summary['macs_cut_at_1pp_with_added']:.1f} % (with added levels)",
              "- targets: " + ", ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in t.items()), ""]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results)
    fig, axes = plt.subplots(len(models), 2, figsize=(11, 4.2 * len(models)), squeeze=False)
    for row, name in zip(axes, models):
        s = results[name]["summary"]
        for ax, key, label in ((row[0], "macs_ratio", "MACs (fraction of full)"), (row[1], "latency_ms", "latency, ms (deploy form)")):
            xs = [r[key] for r in s["levels"]]
            ax.errorbar(xs, [100 * r["twin_accuracy"][0] for r in s["levels"]], yerr=[100 * r["twin_accuracy"][1] for r in s["levels"]],
                        fmt="s--", capsize=3, label="independent twins")
            ax.errorbar(xs, [100 * r["accuracy"][0] for r in s["levels"]], yerr=[100 * r["accuracy"][1] for r in s["levels"]],
                        fmt="o-", capsize=3, label="elastic levels (trained)")
            if s["added"]:
                ax.errorbar([a[key] for a in s["added"]], [100 * a["accuracy"][0] for a in s["added"]],
                            yerr=[100 * a["accuracy"][1] for a in s["added"]], fmt="^", capsize=3, label="added levels (no training)")
            if s.get("searched"):
                ax.errorbar([a[key] for a in s["searched"]], [100 * a["accuracy"][0] for a in s["searched"]],
                            yerr=[100 * a["accuracy"][1] for a in s["searched"]], fmt="v", capsize=3,
                            label="searched subnets (no training)")
            full = 100 * s["levels"][-1]["twin_accuracy"][0]
            ax.axhline(full - 1, color="grey", lw=0.8, ls=":", label="full twin - 1 pp")
            if key == "macs_ratio":
                ax.axvline(0.4, color="grey", lw=0.8, ls="-.")
            ax.set_xlabel(label)
            ax.set_ylabel("test accuracy (%)")
            ax.set_title(f"{name.replace(':', ' ')}\nmean ± std over seeds {s['seeds']}", fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


# settings that may differ between the processes whose results --merge combines
_PER_PROCESS = {"models", "seeds", "out", "resume", "quiet", "device", "twin_cache", "merge", "twins_only", "twins_from",
                "twin_init"}


def merge(args: argparse.Namespace) -> int:
    """Combine result files of separate processes (e.g. one per model or seed) into ``--out``: JSON, table, plot."""
    files = [json.loads(Path(f).read_text()) for f in args.merge.split(",")]
    defaults = vars(build_parser().parse_args([]))  # a setting missing from an older file had its default
    for data in files:
        data["args"] = {**defaults, "twin_init": "reset", **data["args"]}  # files before --twin-init had reset twins
    settings = {k: v for k, v in files[0]["args"].items() if k not in _PER_PROCESS}
    results: dict = {}
    for path, data in zip(args.merge.split(","), files):
        other = {k: v for k, v in data["args"].items() if k not in _PER_PROCESS}
        changed = sorted(k for k in set(other) | set(settings) if other.get(k) != settings.get(k))
        if changed:
            raise SystemExit(f"--merge: {path} was run with other settings ({', '.join(changed)})")
        for name, entry in data["results"].items():
            target = results.setdefault(name, {"runs": []})
            seeds = {r["seed"] for r in target["runs"]}
            target["runs"] += [r for r in entry["runs"] if r["seed"] not in seeds]
            target.update(train_samples=entry["train_samples"], test_samples=entry["test_samples"])
    run_args = argparse.Namespace(**{**files[0]["args"], "twin_init": args.twin_init})
    inits = {name: data["args"]["twin_init"] for data in files for name in data["results"]}
    # twins by architecture from the cache: results written before the added-levels index fix
    # (twins of em.levels[i] after add_level, i.e. of other architectures) get their own twins
    cache = load_twins(Path(args.twin_cache)) if args.twin_cache else {}
    for name, entry in results.items():
        for run in entry["runs"]:
            for row in run["levels"]:
                hit = cache.get(twin_key(name, run["seed"], row["channels"], run_args))
                if hit is None and inits[name] != args.twin_init:
                    raise SystemExit(f"--merge: no {args.twin_init}-initialised twin of {name} seed {run['seed']} in "
                                     f"{args.twin_cache}; train them first: --twins-from {args.merge} --twin-init "
                                     f"{args.twin_init}")
                if hit is None and not row.get("twin_corrected"):
                    row["twin_unchecked"] = True
                elif hit is not None and inits[name] != args.twin_init:  # the run's twins had another initialisation
                    row.setdefault(f"twin_accuracy_{inits[name]}_init", row["twin_accuracy"])
                    row.pop("from", None)  # where the replaced twin came from
                    row.update(hit)
                elif hit is not None and hit["twin_accuracy"] != row.get("twin_accuracy"):
                    row.update(hit, twin_corrected=True)
                row["delta_pp"] = 100 * (row["accuracy"] - row["twin_accuracy"])
    tables = []
    for name, entry in results.items():
        entry["runs"].sort(key=lambda r: r["seed"])
        entry["summary"] = summarize(entry["runs"])
        tables.append(table(name, entry["summary"], run_args, entry["train_samples"], entry["test_samples"]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(run_args), "merged_from": args.merge.split(","), "device": files[0]["device"],
                               "torch": files[0]["torch"], "date": files[0]["date"], "results": results}, indent=2))
    text = "\n".join(tables)
    print(text)
    out.with_suffix(".md").write_text(text + "\n")
    plot(results, out.with_suffix(".png"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet20,mobilenetv2_tiny",
                   help="comma-separated model names, each optionally with :key=value arguments "
                        "(vgg16_bn:width_multiplier=0.25)")
    p.add_argument("--data", default="fashion_mnist")
    p.add_argument("--data-root", default=None)
    p.add_argument("--limit", type=int, default=6000, help="training samples (the test split is always whole)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--levels", default="macs:0.1,0.25,0.4,1.0", help="macs:... or widths:... (smallest first)")
    p.add_argument("--extra", type=int, default=4, help="levels added after training (add_level)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--search", type=int, default=0,
                   help="random nested configurations tried per added point on the validation split (0: no search)")
    p.add_argument("--grow-mode", default="joint")
    p.add_argument("--importance", default="l1")
    p.add_argument("--prune-steps", type=int, default=3)
    p.add_argument("--finetune-epochs", type=int, default=1)
    p.add_argument("--core-epochs", type=int, default=None, help="fine-tuning epochs of the last pruning step (the core); "
                   "default --finetune-epochs")
    p.add_argument("--grow-epochs", type=int, default=1)
    p.add_argument("--pretrain-epochs", type=int, default=None, help="default: --epochs")
    p.add_argument("--final-grow-epochs", type=int, default=None, help="the last (joint: all levels) grow step; default --grow-epochs")
    p.add_argument("--final-grow-levels", type=int, default=1,
                   help="freeze mode: the largest levels that train together in the last grow step (1: the full level alone)")
    p.add_argument("--grow-lr", type=float, default=None, help="default: the strategy's (lr / 2)")
    p.add_argument("--finetune-lr", type=float, default=None, help="default: the strategy's (lr / 5)")
    p.add_argument("--path-samples", type=int, default=0, help="random points between levels per joint batch")
    p.add_argument("--distill", type=float, default=0.0, help="weight of distillation from the pretrained network")
    p.add_argument("--distill-temperature", type=float, default=4.0)
    p.add_argument("--val-limit", type=int, default=2000, help="validation samples fit reports on (0: all)")
    p.add_argument("--no-twins", action="store_true", help="elastic levels only (quick iteration)")
    p.add_argument("--twins-only", action="store_true",
                   help="pretrain and choose the levels, then train only their twins into --twin-cache")
    p.add_argument("--twin-init", choices=("model", "reset"), default="model",
                   help="twins' initialisation: the model zoo's own (Kaiming-normal convolutions, as create_model gives "
                        "the full network) or PyTorch's per-layer default (results before 2026-11-26's sixth session)")
    p.add_argument("--twins-from", default=None,
                   help="comma-separated result files: train the twins of their trained levels into the cache, nothing else")
    p.add_argument("--twin-cache", default="benchmarks/results/prune_and_grow_frontier_twins.json",
                   help="twin accuracies by architecture, seed and training settings ('' : no cache)")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--latency-batch", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="benchmarks/results/prune_and_grow_frontier.json")
    p.add_argument("--resume", action="store_true", help="keep the seeds already in --out")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--merge", default=None, help="comma-separated result files to combine into --out (no training)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.twins_from:
        return twins_from(args, resolve_device(args.device))
    if args.merge:
        return merge(args)
    device = resolve_device(args.device)
    out = Path(args.out)
    results: dict = json.loads(out.read_text())["results"] if args.resume and out.is_file() else {}
    tables = []
    for name in args.models.split(","):
        entry = results.setdefault(name, {"runs": []})
        done = {r["seed"] for r in entry["runs"]}
        for seed in (int(s) for s in args.seeds.split(",")):
            if seed in done:
                continue
            splits = ne.data.load_dataset(args.data, root=args.data_root, limit=args.limit, seed=seed)
            test = splits.test if splits.test is not None else splits.val
            run = run_seed(name, seed, args, splits, test, device)
            if args.twins_only:
                continue
            entry["runs"].append(run)
            if not args.no_twins:
                entry["summary"] = summarize(entry["runs"])
            entry.update(train_samples=len(splits.train), test_samples=len(test))
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"args": vars(args), "device": str(device), "torch": torch.__version__,
                                       "date": time.strftime("%Y-%m-%d"), "results": results}, indent=2))
        if entry["runs"] and not args.no_twins and not args.twins_only:
            entry["summary"] = summarize(entry["runs"])
            tables.append(table(name, entry["summary"], args, entry["train_samples"], entry["test_samples"]))
    text = "\n".join(tables)
    print(text)
    if tables:
        out.with_suffix(".md").write_text(text + "\n")
        plot(results, out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
