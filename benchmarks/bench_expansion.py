"""Expansion-score growth: cost of the growth check, and grown networks versus fixed ones.

1. Check cost (ResNet-20, N=128, 28x28), measured side by side (interleaved, medians): one training
   step at batch 128, the full check (current model + all width candidates) and the default cheap
   check (``candidate_top_k``), as a share of training at one check per 100 steps.
2. Growth quality, per seed: expansion growth from a small growable CNN; then, trained from scratch
   with the same optimizer, schedule and data order,
   * the fixed *final* architecture for the same total number of optimizer steps as the growth run,
   * the fixed *starting* architecture for the same steps,
   * every intermediate checkpoint's architecture for the number of steps that checkpoint had
     (the accuracy-vs-params curve: a checkpoint against a fixed network of its size and steps).
   Test accuracy on the full test set; params, MACs, steps and wall time; JSON and the curve plot.

    OMP_NUM_THREADS=1 python benchmarks/bench_expansion.py --data fashion_mnist --limit 20000 --epochs 10 --seeds 0,1,2
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import nni_elastic as ne
from nni_elastic.device import resolve_device
from nni_elastic.measure import count_macs
from nni_elastic.strategies import load_growth_checkpoint
from nni_elastic.training import TrainConfig, evaluate, make_optimizer, train


def check_cost(device: torch.device, size: int, repeats: int, top_k: tuple[int, ...]) -> dict:
    """Step, full check and top-k checks on ResNet-20, interleaved so that load changes hit all alike."""
    torch.manual_seed(0)
    model = ne.create_model("resnet20", num_classes=10, in_channels=1).to(device)
    x = torch.randn(128, 1, size, size, device=device)
    y = torch.randint(0, 10, (128,), device=device)
    example = torch.zeros(1, 1, size, size, device=device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step() -> None:
        model.train()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    checks = {"full": ne.ExpansionGrowth(quiet=True, candidate_top_k=None)}
    checks.update({f"top{k}": ne.ExpansionGrowth(quiet=True, candidate_top_k=k) for k in top_k})
    times: dict[str, list[float]] = {"step": [], **{k: [] for k in checks}}
    agree = {k: 0 for k in checks}
    regret = {k: [] for k in checks}
    step()
    for _ in range(repeats):  # one training step, then every check on that same model state
        start = time.perf_counter(); step(); sync(); times["step"].append(time.perf_counter() - start)
        decisions = {}
        for name, eg in checks.items():
            start = time.perf_counter(); decisions[name] = eg.check(model, x, y, example=example); sync()
            times[name].append(time.perf_counter() - start)
        full = decisions["full"]
        for name, d in decisions.items():
            agree[name] += d["best"] == full["best"]
            regret[name].append(full["candidates"][full["best"]]["gain"] - full["candidates"][d["best"]]["gain"])
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {"params": sum(p.numel() for p in model.parameters()), "step_s": med["step"],
           "candidates": len(decisions["full"]["candidates"]), "repeats": repeats}
    for name in checks:
        out[name] = {"check_s": med[name], "every_100_steps_pct": 100 * med[name] / (100 * med["step"]),
                     "same_best_as_full": agree[name], "mean_gain_lost": statistics.mean(regret[name])}
    return out


def reinit(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    for m in model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
        if hasattr(m, "reset_running_stats"):
            m.reset_running_stats()
    return model


def train_fixed(model: torch.nn.Module, splits, steps: int, args, seed: int, device) -> dict:
    """Train ``model`` from scratch for ``steps`` optimizer steps (whole epochs + a partial one), cosine over all."""
    steps_per_epoch = math.ceil(len(splits.train) / args.batch_size)
    epochs = math.ceil(steps / steps_per_epoch)
    cfg = TrainConfig(epochs=epochs, batch_size=args.batch_size, lr=args.lr, seed=seed)
    opt = make_optimizer(list(model.parameters()), cfg)  # what the growth run uses
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)

    class Stop(Exception):
        pass

    def after(_, step: int) -> None:
        if step >= steps:
            raise Stop

    start = time.time()
    try:
        train(model, splits.train, None, cfg, device=device, quiet=True, optimizer=opt, scheduler=sched, after_step=after)
    except Stop:
        pass
    return {"accuracy": evaluate(model, splits.test_set, device=device)["accuracy"], "seconds": time.time() - start,
            "steps": steps}


def growth_settings(args) -> dict:
    keys = ("criterion", "threshold", "tau", "size_lambda", "check_every", "warmup_steps", "grow_until",
            "max_expansions", "max_params", "candidate_top_k", "width_fraction", "lr_schedule", "candidates",
            "new_layer_noise", "history", "history_per_step", "history_distill", "history_bn", "history_smallest",
            "history_weight")
    out = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    out["candidates"] = out["candidates"].split(",")
    if out.get("history_per_step") == 0:
        out["history_per_step"] = None  # every history level at every step
    return out


def arch_key(model: torch.nn.Module) -> tuple:
    return tuple((n, tuple(p.shape)) for n, p in model.named_parameters())


class FixedRuns:
    """Fixed networks trained from scratch, one per architecture, steps and seed; optionally kept in a JSON file
    (``--fixed-cache``) so that runs of other growth settings reuse them."""

    def __init__(self, args, splits, device) -> None:
        self.args, self.splits, self.device = args, splits, device
        self.path = Path(args.fixed_cache) if args.fixed_cache else None
        self.runs = json.loads(self.path.read_text()) if self.path is not None and self.path.is_file() else {}

    def __call__(self, model: torch.nn.Module, steps: int, seed: int, init=None) -> dict:
        a = self.args
        key = json.dumps([a.data, a.limit, a.batch_size, a.lr, seed, steps, arch_key(model)])
        if key not in self.runs and self.path is not None and self.path.is_file():  # another run may have added it
            self.runs.update(json.loads(self.path.read_text()))
        if key not in self.runs:
            model = init(model) if init is not None else model
            self.runs[key] = train_fixed(model, self.splits, steps, a, seed, self.device)
            if self.path is not None:
                self.path.write_text(json.dumps(self.runs))
        return self.runs[key]


def one_seed(args, splits, seed: int, device, ckpt_dir: Path, fixed_runs: FixedRuns) -> dict:
    channels = [int(c) for c in args.channels.split(",")]
    torch.manual_seed(seed)
    start_model = ne.create_model("growable_cnn", num_classes=splits.num_classes, in_channels=splits.in_channels,
                                  channels=channels, blocks=[0] * len(channels), residual=args.residual)
    eg = ne.ExpansionGrowth(**growth_settings(args), score_batch=128, epochs=args.epochs, batch_size=args.batch_size,
                            lr=args.lr, seed=seed, device=args.device, quiet=True,
                            checkpoint_dir=ckpt_dir / f"seed{seed}")
    start = time.time()
    result = eg.fit(start_model, splits.train, splits.val)
    res = result.details
    growth_s = time.time() - start
    total_steps = args.epochs * math.ceil(len(splits.train) / args.batch_size)
    example = splits.train[0][0].unsqueeze(0).to(device)
    torch.manual_seed(seed)
    start_arch = ne.create_model("growable_cnn", num_classes=splits.num_classes, in_channels=splits.in_channels,
                                 channels=channels, blocks=[0] * len(channels), residual=args.residual)
    fs = fixed_runs(start_arch, total_steps, seed)  # history="nested": level 0 is this architecture and steps
    levels = []
    for c in res.checkpoints:
        grown, _ = load_growth_checkpoint(c.path)
        acc = evaluate(grown, splits.test_set, device=device)["accuracy"]
        fixed = fixed_runs(grown, max(1, c.step), seed, init=lambda m: reinit(m, seed))
        levels.append({"level": c.level, "params": c.params, "macs": c.macs, "step": c.step, "expansion": c.expansion,
                       "closed_at": c.closed_at, "snapshot_accuracy": c.snapshot_accuracy,
                       "checkpoint_accuracy": acc, "fixed_accuracy_same_steps": fixed["accuracy"],
                       "fixed_seconds": fixed["seconds"]})
        print(f"  seed {seed} level {c.level}: {c.params} params, checkpoint {100 * acc:.2f} % after {c.step} steps, "
              f"fixed net of that size {100 * fixed['accuracy']:.2f} % after {c.step} steps", flush=True)
    final_model = res.model
    fixed_final = levels[-1]["fixed_accuracy_same_steps"]
    row = {"seed": seed, "grown_final": levels[-1]["checkpoint_accuracy"], "fixed_final": fixed_final,
           "fixed_start": fs["accuracy"], "params_final": levels[-1]["params"], "params_start": levels[0]["params"],
           "macs_final": count_macs(final_model.to(device), example), "macs_start": levels[0]["macs"],
           "steps": total_steps, "growth_seconds": growth_s, "fixed_start_seconds": fs["seconds"],
           "fixed_final_seconds": levels[-1]["fixed_seconds"], "expansions": [e["name"] for e in res.expansions],
           # training compute (forward MACs x samples, checks excluded) against the fixed final network's
           "compute_vs_fixed_final": result.compute["full_epochs"] / args.epochs,
           "expansion_steps": [e["step"] for e in res.expansions], "levels": levels, "checks": eg.checks_}
    gap = row["fixed_final"] - row["fixed_start"]
    row["within_1pp_of_fixed_final"] = row["grown_final"] >= row["fixed_final"] - 0.01
    row["beats_start_by_half_gap"] = row["grown_final"] - row["fixed_start"] >= 0.5 * gap
    row["curve_no_worse"] = curve_no_worse(levels)
    return row


def curve_no_worse(levels: list[dict]) -> bool:
    """Target 3 on one seed: every earlier level's checkpoint within 0.5 pp of a fixed network of its
    size and steps, or better (the final checkpoint is target 1's, with its 1 pp)."""
    return all(lv["checkpoint_accuracy"] >= lv["fixed_accuracy_same_steps"] - 0.005 for lv in levels[:-1])


def summarise(rows: list[dict]) -> list[str]:
    def ms(key: str, scale: float = 100.0) -> str:
        vals = [scale * r[key] for r in rows]
        return f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f}" if len(vals) > 1 else f"{vals[0]:.2f}"

    lines = ["| seed | grown final | fixed final (same steps) | fixed start (same steps) | params start -> final | MACs final | "
             "expansions | steps | growth s | fixed-final s | fixed-start s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['seed']} | {100 * r['grown_final']:.2f} | {100 * r['fixed_final']:.2f} | {100 * r['fixed_start']:.2f} | "
                     f"{r['params_start']} -> {r['params_final']} | {r['macs_final']} | {len(r['expansions'])} "
                     f"(steps {r['expansion_steps']}) | {r['steps']} | {r['growth_seconds']:.0f} | {r['fixed_final_seconds']:.0f} | "
                     f"{r['fixed_start_seconds']:.0f} |")
    lines.append(f"| mean ± std | {ms('grown_final')} | {ms('fixed_final')} | {ms('fixed_start')} | "
                 f"{statistics.mean(r['params_final'] for r in rows):.0f} | | | | | | |")
    gaps = [100 * (r["grown_final"] - r["fixed_final"]) for r in rows]
    share = [(r["grown_final"] - r["fixed_start"]) / max(1e-9, r["fixed_final"] - r["fixed_start"]) for r in rows]
    earlier = [100 * (lv["checkpoint_accuracy"] - lv["fixed_accuracy_same_steps"]) for r in rows for lv in r["levels"][:-1]]

    def verdict(flags: list[bool]) -> str:
        return "met on every seed" if all(flags) else f"met on {sum(flags)} of {len(flags)} seeds"

    lines.append("")
    lines.append(f"1. grown - fixed final: {[round(g, 2) for g in gaps]} pp, mean {statistics.mean(gaps):+.2f} "
                 f"(target >= -1: {verdict([r['within_1pp_of_fixed_final'] for r in rows])}; "
                 f"{'met' if statistics.mean(gaps) >= -1 else 'NOT met'} in the mean)")
    lines.append(f"2. share of the start->final gap recovered: {[round(s, 2) for s in share]} (target >= 0.5: "
                 f"{verdict([r['beats_start_by_half_gap'] for r in rows])})")
    lines.append(f"3. curve: earlier levels' checkpoints - fixed nets of their size and steps: "
                 f"{[round(e, 2) for e in earlier]} pp, mean {statistics.mean(earlier) if earlier else 0.0:+.2f} "
                 f"(every one within 0.5 pp or better: {verdict([curve_no_worse(r['levels']) for r in rows])})")
    compute = [r.get("compute_vs_fixed_final") for r in rows]
    if all(c is not None for c in compute):
        wall = [r["growth_seconds"] / r["fixed_final_seconds"] for r in rows]
        lines.append(f"training compute (forward MACs x samples, checks excluded) / fixed final's: "
                     f"{[round(c, 2) for c in compute]}; wall time growth / fixed final: {[round(w, 2) for w in wall]}")
    total = all("fixed_accuracy_total_steps" in lv for r in rows for lv in r["levels"])
    lines += ["", "| seed | level | params | closed at step | accuracy then | checkpoint (steps) | fixed, same size and steps | "
              "difference (pp) |" + (" fixed, same size, all steps | difference (pp) |" if total else ""),
              "|---|---|---|---|---|---|---|---|" + ("---|---|" if total else "")]
    for r in rows:
        for lv in r["levels"]:
            then = lv.get("snapshot_accuracy")
            acc = lv["checkpoint_accuracy"]
            line = (f"| {r['seed']} | {lv['level']} | {lv['params']} | {lv.get('closed_at') or ''} | "
                    f"{'' if then is None else f'{100 * then:.2f}'} | {100 * acc:.2f} ({lv['step']}) | "
                    f"{100 * lv['fixed_accuracy_same_steps']:.2f} | {100 * (acc - lv['fixed_accuracy_same_steps']):+.2f} |")
            if total:
                line += f" {100 * lv['fixed_accuracy_total_steps']:.2f} | {100 * (acc - lv['fixed_accuracy_total_steps']):+.2f} |"
            lines.append(line)
    return lines


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for i, r in enumerate(rows):
        params = [lv["params"] for lv in r["levels"]]
        ax.plot(params, [100 * lv["checkpoint_accuracy"] for lv in r["levels"]], "o-", color="C0", alpha=0.8,
                label="growth checkpoints" if i == 0 else None)
        ax.plot(params, [100 * lv["fixed_accuracy_same_steps"] for lv in r["levels"]], "s--", color="C1", alpha=0.8,
                label="fixed, same size and steps" if i == 0 else None)
        ax.plot([r["params_start"]], [100 * r["fixed_start"]], "v", color="C2", label="fixed start, all steps" if i == 0 else None)
        then = [(lv["params"], 100 * lv["snapshot_accuracy"]) for lv in r["levels"] if lv.get("snapshot_accuracy") is not None]
        if then:
            ax.plot(*zip(*then), "x", color="0.6", label="checkpoint when its level closed" if i == 0 else None)
    ax.set_xscale("log"); ax.set_xlabel("parameters"); ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize=8); ax.grid(alpha=0.3)
    fig.tight_layout(); fig.savefig(path, dpi=120); plt.close(fig)


def add_total_steps(files: list[Path], runs: list[dict], args, device) -> None:
    """Each checkpoint against a fixed network of its architecture trained for the run's total steps
    (``fixed_accuracy_total_steps``; the same as ``fixed_accuracy_same_steps`` when the checkpoint had them all)."""
    a = argparse.Namespace(**{**runs[0]["args"], "fixed_cache": args.fixed_cache})
    splits = ne.data.load_dataset(a.data, root=a.data_root, limit=a.limit)
    splits.test_set = splits.test if splits.test is not None else splits.val
    fixed_runs = FixedRuns(a, splits, device)
    for f, run in zip(files, runs):
        for r in run["seeds"]:
            for lv in r["levels"]:
                if lv["step"] == r["steps"]:
                    lv["fixed_accuracy_total_steps"] = lv["fixed_accuracy_same_steps"]
                    continue
                grown, _ = load_growth_checkpoint(f.parent / f"{f.stem}_checkpoints" / f"seed{r['seed']}" / f"level{lv['level']}.pt")
                lv["fixed_accuracy_total_steps"] = fixed_runs(grown, r["steps"], r["seed"],
                                                              init=lambda m: reinit(m, r["seed"]))["accuracy"]


def merge(files: list[Path], out: Path, args=None, device=None) -> int:
    """Combine single-seed runs (e.g. run as parallel processes) into one result, table and plot."""
    runs = [json.loads(f.read_text()) for f in files]
    if args is not None and args.fixed_total:
        add_total_steps(files, runs, args, device)
    result = {**runs[0], "seeds": [r for run in runs for r in run["seeds"]], "merged_from": [str(f) for f in files]}
    result["args"] = {**runs[0]["args"], "seeds": ",".join(str(r["seed"]) for r in result["seeds"])}
    if out.is_file():  # keep the check cost measured by an earlier run
        old = json.loads(out.read_text())
        result.update({k: old[k] for k in ("check_cost", "check_cost_args") if k in old})
    table = summarise(result["seeds"])
    print("\n".join(table))
    out.with_suffix(".md").write_text("\n".join(table) + "\n")
    plot(result["seeds"], out.parent / f"{out.stem}_curve.png")
    out.write_text(json.dumps(result, indent=2, default=str))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="fashion_mnist")
    p.add_argument("--data-root", default=None)
    p.add_argument("--limit", type=int, default=20000, help="training samples (the test set is always whole)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--channels", default="8,16,32")
    p.add_argument("--residual", action="store_true", help="growable_cnn with residual blocks (added ones: zero last conv)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    # growth settings (None: the strategy's default)
    p.add_argument("--criterion", default=None)
    p.add_argument("--threshold", type=float, default=None)
    p.add_argument("--tau", type=float, default=None)
    p.add_argument("--size-lambda", type=float, default=None)
    p.add_argument("--check-every", type=int, default=None)
    p.add_argument("--warmup-steps", type=int, default=None)
    p.add_argument("--grow-until", type=float, default=None)
    p.add_argument("--max-expansions", type=int, default=None)
    p.add_argument("--max-params", type=int, default=200000)
    p.add_argument("--candidate-top-k", type=int, default=None)
    p.add_argument("--width-fraction", type=float, default=None)
    p.add_argument("--lr-schedule", default=None)
    p.add_argument("--new-layer-noise", type=float, default=None)
    p.add_argument("--candidates", default="depth,width")
    p.add_argument("--history", default=None, help="snapshot | nested")
    p.add_argument("--history-per-step", type=int, default=None, help="0: every history level at every step")
    p.add_argument("--history-distill", type=float, default=None)
    p.add_argument("--history-bn", default=None, help="shared | private")
    p.add_argument("--history-smallest", action="store_true", default=None)
    p.add_argument("--history-weight", type=float, default=None)
    p.add_argument("--cost-repeats", type=int, default=5)
    p.add_argument("--skip-cost", action="store_true")
    p.add_argument("--skip-growth", action="store_true")
    p.add_argument("--merge", default=None, help="comma-separated JSON files of single-seed runs (same settings) to "
                   "combine into --out (its check cost is kept); no training")
    p.add_argument("--fixed-total", action="store_true", help="with --merge: also compare every checkpoint with a "
                   "fixed network of its architecture trained for all the run's steps")
    p.add_argument("--fixed-cache", default=None, help="JSON file of fixed-network results to reuse across runs")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="benchmarks/results/expansion.json")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.merge:
        return merge([Path(f) for f in args.merge.split(",")], out, args, device)
    result = {"args": vars(args), "device": str(device), "torch_threads": torch.get_num_threads()}
    if args.skip_growth and out.is_file():  # keep the growth results of an earlier run
        result = {**json.loads(out.read_text()), "cost_args": vars(args)}
    if not args.skip_cost:
        cost = check_cost(device, 28, args.cost_repeats, (1, 2, 3))
        result["check_cost"] = cost
        print(f"check cost (ResNet-20, {cost['params']} params, N=128, 28x28, {cost['candidates']} width candidates; "
              f"one training step {cost['step_s']:.3f} s; medians of {cost['repeats']} interleaved runs):", flush=True)
        for name in ("full", "top1", "top2", "top3"):
            c = cost[name]
            print(f"  {name}: {c['check_s']:.2f} s = {c['every_100_steps_pct']:.1f} % of training at one check per 100 steps; "
                  f"same best candidate as the full check in {c['same_best_as_full']}/{cost['repeats']} states, "
                  f"mean gain given up {c['mean_gain_lost']:.4f}")
    if not args.skip_growth:
        splits = ne.data.load_dataset(args.data, root=args.data_root, limit=args.limit)
        splits.test_set = splits.test if splits.test is not None else splits.val
        rows = []
        fixed_runs = FixedRuns(args, splits, device)
        for seed in [int(s) for s in args.seeds.split(",")]:
            rows.append(one_seed(args, splits, seed, device, out.parent / f"{out.stem}_checkpoints", fixed_runs))
            out.write_text(json.dumps({**result, "seeds": rows}, indent=2, default=str))
        result["seeds"] = rows
        table = summarise(rows)
        print("\n".join(table))
        out.with_suffix(".md").write_text("\n".join(table) + "\n")
        plot(rows, out.parent / f"{out.stem}_curve.png")
    out.write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
