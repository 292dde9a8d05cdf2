"""Prune-and-grow levels versus independently trained networks of the same widths.

For each width, a ResNet-20 of that width is trained from scratch for ``--epochs`` epochs (the
"twin"); prune-and-grow pretrains the full width for the same epochs, then prunes and grows. The
script reports each level's test accuracy beside its twin's, the total training compute
(sum of MACs x samples, in units of one full-width training) and the MACs cut at <= 1 pp
accuracy loss, prints a markdown table and writes JSON.

Targets (issue): every level within 0.3 pp of its twin (the smallest at or above it); compute
<= 1.5x one full training.

    python benchmarks/bench_prune_and_grow.py --data fashion_mnist --limit 12000 --epochs 8
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import nni_elastic as ne
from nni_elastic.device import resolve_device
from nni_elastic.training import TrainConfig, evaluate, train


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--data", default="fashion_mnist")
    p.add_argument("--data-root", default=None)
    p.add_argument("--limit", type=int, default=12000, help="training samples (the test split is always whole)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--widths", default="0.25,0.5,0.75,1.0")
    p.add_argument("--grow-mode", default="joint")
    p.add_argument("--regrow", default="restore")
    p.add_argument("--prune-steps", type=int, default=3)
    p.add_argument("--finetune-epochs", type=int, default=1)
    p.add_argument("--grow-epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--skip-twins", action="store_true", help="reuse twin results from --out if present")
    p.add_argument("--out", default="benchmarks/results/prune_and_grow.json")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    widths = tuple(float(w) for w in args.widths.split(","))
    device = resolve_device(args.device)
    splits = ne.data.load_dataset(args.data, root=args.data_root, limit=args.limit, seed=args.seed)
    test = splits.test if splits.test is not None else splits.val
    n = len(splits.train)
    cfg = TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed)
    out = Path(args.out)
    previous = json.loads(out.read_text()) if out.is_file() else {}

    def macs_of(model: torch.nn.Module) -> int:
        import torch_pruning as tp

        return int(tp.utils.count_ops_and_params(model.eval(), splits.example_inputs().to(device))[0])

    twins = previous.get("twins") if args.skip_twins and previous.get("twins") else None
    if twins is None:
        twins = []
        for w in widths:
            torch.manual_seed(args.seed)
            model = ne.create_model(args.model, num_classes=splits.num_classes, in_channels=splits.in_channels, width_multiplier=w)
            start = time.time()
            train(model, splits.train, None, cfg, device=device, quiet=args.quiet, desc=f"twin {w}")
            twins.append({"width": w, "accuracy": evaluate(model, test, device=device)["accuracy"], "macs": macs_of(model),
                          "seconds": time.time() - start})
            print(f"twin width {w}: test accuracy {twins[-1]['accuracy']:.4f} ({twins[-1]['seconds']:.0f} s)", flush=True)
    full_macs = twins[-1]["macs"]
    for t in twins:
        t["full_epochs"] = args.epochs * t["macs"] / full_macs

    torch.manual_seed(args.seed)
    model = ne.create_model(args.model, num_classes=splits.num_classes, in_channels=splits.in_channels)
    pg = ne.PruneAndGrow(widths=widths, pretrain_epochs=args.epochs, prune_steps=args.prune_steps,
                         finetune_epochs=args.finetune_epochs, grow_epochs=args.grow_epochs, grow_mode=args.grow_mode,
                         regrow=args.regrow, lr=args.lr, batch_size=args.batch_size, seed=args.seed, device=args.device,
                         quiet=args.quiet)
    start = time.time()
    em = pg.fit(model, splits.train, splits.val).elastic_model
    seconds = time.time() - start
    levels = []
    for lv, twin in zip(em.levels, twins):
        with em.use_level(lv.index):
            acc = evaluate(em, test, device=device)["accuracy"]
        levels.append({"width": lv.width, "macs": lv.macs, "macs_ratio": lv.macs / em.levels[-1].macs, "accuracy": acc,
                       "twin_accuracy": twin["accuracy"], "delta_pp": 100 * (acc - twin["accuracy"]),
                       "twin_macs": twin["macs"]})
    compute = pg.compute_["full_epochs"] / args.epochs
    twins_compute = sum(t["full_epochs"] for t in twins) / args.epochs
    full_acc = twins[-1]["accuracy"]
    ok = [lv for lv in levels if lv["accuracy"] >= full_acc - 0.01]
    cut = 1 - min(lv["macs_ratio"] for lv in ok) if ok else 0.0
    result = {
        "args": vars(args), "device": str(device), "train_samples": n, "test_samples": len(test),
        "twins": twins, "levels": levels, "prune_and_grow_seconds": seconds,
        "compute_vs_one_full_training": compute, "twins_compute_vs_one_full_training": twins_compute,
        "macs_cut_at_1pp": cut, "worst_delta_pp": min(lv["delta_pp"] for lv in levels),
        "steps": pg.records_["steps"],
    }
    lines = [
        f"{args.model} on {args.data} ({n} train samples, {len(test)} test), {args.epochs} epochs, "
        f"grow_mode={args.grow_mode}, regrow={args.regrow}, finetune_epochs={args.finetune_epochs}, grow_epochs={args.grow_epochs}",
        "",
        "| width | MACs ratio | elastic level acc | independent twin acc | delta (pp) |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {lv['width']:.2f} | {lv['macs_ratio']:.3f} | {100 * lv['accuracy']:.2f} | {100 * lv['twin_accuracy']:.2f} | {lv['delta_pp']:+.2f} |" for lv in levels]
    lines += [
        "",
        f"training compute: prune-and-grow {compute:.2f}x one full training; four separate widths {twins_compute:.2f}x",
        f"MACs cut at <= 1 pp loss vs the full twin: {100 * cut:.1f} %",
        f"targets: every level >= twin - 0.3 pp: {'met' if result['worst_delta_pp'] >= -0.3 else 'MISSED'} "
        f"(worst {result['worst_delta_pp']:+.2f} pp); compute <= 1.5x: {'met' if compute <= 1.5 else 'MISSED'}",
    ]
    table = "\n".join(lines)
    print(table)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
