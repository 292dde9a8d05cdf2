"""Expansion-score growth: cost of the score, and checkpoints versus fixed networks of the same sizes.

1. Score cost: one natural expansion score of ResNet-20 (N=128 samples) versus one training step
   (batch 128), measured side by side; the cost of checking every 100 steps as a share of training,
   for one score and for a full check (current model plus every candidate).
2. Growth quality: expansion growth from a small growable CNN for ``--epochs`` epochs; every
   checkpoint's architecture is then trained from scratch for the same number of epochs (the
   "fixed" network of the same size). Table and accuracy-vs-params plot; JSON.

    python benchmarks/bench_expansion.py --data fashion_mnist --limit 10000 --epochs 6
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import nni_elastic as ne
from nni_elastic.device import resolve_device
from nni_elastic.expansion import FisherGram
from nni_elastic.strategies import load_growth_checkpoint
from nni_elastic.training import TrainConfig, evaluate, train


def score_cost(device: torch.device, size: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = ne.create_model("resnet20", num_classes=10, in_channels=1).to(device)
    x = torch.randn(128, 1, size, size, device=device)
    y = torch.randint(0, 10, (128,), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step() -> None:
        model.train()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    def score() -> None:
        FisherGram.of(model, x, y).score(1.0)

    step(); score()
    steps, scores = [], []
    for _ in range(repeats):  # interleaved
        start = time.perf_counter(); step(); sync(); steps.append(time.perf_counter() - start)
        start = time.perf_counter(); score(); sync(); scores.append(time.perf_counter() - start)
    s, t = statistics.median(scores), statistics.median(steps)
    params = sum(p.numel() for p in model.parameters())
    eg = ne.ExpansionGrowth(quiet=True)
    example = torch.zeros(1, 1, size, size, device=device)
    n_candidates = len(eg._candidates(model, example))
    start = time.perf_counter()
    eg.check(model, x, y, example=example)  # the current model and every width candidate (new entries only)
    sync()
    check = time.perf_counter() - start
    return {"params": params, "score_s": s, "step_s": t, "score_over_step": s / t,
            "one_score_every_100_steps_pct": 100 * s / (100 * t), "candidates_resnet20": n_candidates,
            "full_check_s": check, "full_check_every_100_steps_pct": 100 * check / (100 * t)}


def reinit(model: torch.nn.Module) -> torch.nn.Module:
    for m in model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
        if hasattr(m, "reset_running_stats"):
            m.reset_running_stats()
    return model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="fashion_mnist")
    p.add_argument("--data-root", default=None)
    p.add_argument("--limit", type=int, default=10000)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--channels", default="8,16,32")
    p.add_argument("--threshold", type=float, default=0.03)
    p.add_argument("--check-every", type=int, default=100)
    p.add_argument("--warmup-steps", type=int, default=200)
    p.add_argument("--max-params", type=int, default=200000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--score-repeats", type=int, default=5)
    p.add_argument("--skip-growth", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="benchmarks/results/expansion.json")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    result = {"args": vars(args), "device": str(device), "torch_threads": torch.get_num_threads()}
    cost = score_cost(device, 28, args.score_repeats)
    result["score_cost"] = cost
    print(f"score cost (ResNet-20, {cost['params']} params, N=128, 28x28): one score {cost['score_s']:.2f} s, "
          f"one training step {cost['step_s']:.3f} s, ratio {cost['score_over_step']:.1f}; "
          f"checking every 100 steps = {cost['one_score_every_100_steps_pct']:.1f} % of training for one score, "
          f"{cost['full_check_every_100_steps_pct']:.0f} % with all {cost['candidates_resnet20']} width candidates", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not args.skip_growth:
        splits = ne.data.load_dataset(args.data, root=args.data_root, limit=args.limit)
        test = splits.test if splits.test is not None else splits.val
        channels = [int(c) for c in args.channels.split(",")]
        torch.manual_seed(0)
        model = ne.create_model("growable_cnn", num_classes=splits.num_classes, in_channels=splits.in_channels,
                                channels=channels, blocks=[0] * len(channels))
        ckpt_dir = out.parent / "expansion_checkpoints"
        eg = ne.ExpansionGrowth(threshold=args.threshold, check_every=args.check_every, warmup_steps=args.warmup_steps,
                                max_params=args.max_params, score_batch=128, epochs=args.epochs, batch_size=args.batch_size,
                                device=args.device, quiet=True, checkpoint_dir=ckpt_dir)
        start = time.time()
        res = eg.fit(model, splits.train, splits.val).details
        growth_s = time.time() - start
        rows = []
        for c in res.checkpoints:
            grown, _ = load_growth_checkpoint(c.path)
            acc = evaluate(grown, test, device=device)["accuracy"]
            torch.manual_seed(0)
            fixed = reinit(grown)
            start = time.time()
            train(fixed, splits.train, None, TrainConfig(epochs=args.epochs, batch_size=args.batch_size), device=device, quiet=True)
            rows.append({"level": c.level, "params": c.params, "macs": c.macs, "step": c.step, "expansion": c.expansion,
                         "checkpoint_accuracy": acc, "fixed_accuracy": evaluate(fixed, test, device=device)["accuracy"],
                         "fixed_seconds": time.time() - start})
            print(f"level {c.level}: {c.params} params, checkpoint {100 * acc:.2f} % (trained {c.step} steps), "
                  f"fixed net {100 * rows[-1]['fixed_accuracy']:.2f} % ({args.epochs} epochs)", flush=True)
        result.update({"growth_seconds": growth_s, "levels": rows, "checks": eg.checks_})
        lines = ["| level | params | MACs | expansion that followed | checkpoint acc | fixed net acc (same epochs) |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['level']} | {r['params']} | {r['macs']} | {r['expansion'] or '(final)'} | {100 * r['checkpoint_accuracy']:.2f} | "
                  f"{100 * r['fixed_accuracy']:.2f} |" for r in rows]
        table = "\n".join(lines)
        print(table)
        out.with_suffix(".md").write_text(table + "\n")
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot([r["params"] for r in rows], [100 * r["checkpoint_accuracy"] for r in rows], "o-", label="growth checkpoints")
        ax.plot([r["params"] for r in rows], [100 * r["fixed_accuracy"] for r in rows], "s--", label="fixed, same epochs")
        ax.set_xlabel("parameters"); ax.set_ylabel("test accuracy (%)"); ax.legend(); ax.grid(alpha=0.3)
        fig.tight_layout(); fig.savefig(out.with_suffix(".png"), dpi=120); plt.close(fig)
    out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
