"""Elastic-level cost on the current device: MACs, sliced vs exported latency, level-switch time.

Per level of ResNet-20 and VGG-16-BN (batch 64, 3x32x32 by default), prints a table and writes
JSON. Sliced and exported latencies are measured side by side, interleaved in one run, so their
ratio is robust to machine noise. Targets: sliced <= 1.15x exported; switch < 100 us.

    python benchmarks/bench_elastic.py --out benchmarks/results/elastic.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import nni_elastic as ne
from nni_elastic.device import resolve_device


def time_ms(fn, repeats: int, sync) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - start) * 1000.0 / repeats


def bench_model(name: str, args: argparse.Namespace, device: torch.device) -> list[dict]:
    torch.manual_seed(0)
    model = ne.create_model(name, num_classes=10, in_channels=3)
    em = ne.ElasticModel(model, torch.randn(1, 3, args.size, args.size), widths=args.widths).to(device).eval()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    levels = em.levels
    full_macs = levels[-1].macs
    # switch time: many switches, averaged (one integer write each)
    n = 20000
    start = time.perf_counter()
    for i in range(n):
        em.set_level(i % len(levels))
    switch_us = (time.perf_counter() - start) * 1e6 / n
    rows = []
    with torch.inference_mode():
        for lv in levels:
            em.set_level(lv.index)
            exported = em.export(lv.index).to(device)
            sliced_fn, export_fn = (lambda: em(x)), (lambda: exported(x))
            for _ in range(args.warmup):
                sliced_fn(); export_fn()
            sliced, exp = [], []
            for _ in range(args.rounds):  # interleave so both see the same machine state
                sliced.append(time_ms(sliced_fn, args.repeats, sync))
                exp.append(time_ms(export_fn, args.repeats, sync))
            s, e = statistics.median(sliced), statistics.median(exp)
            rows.append({
                "model": name, "level": lv.index, "width": lv.width, "macs": lv.macs, "params": lv.params,
                "macs_ratio": lv.macs / full_macs, "sliced_ms": s, "exported_ms": e, "sliced_over_exported": s / e,
                "switch_us": switch_us,
            })
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet20,vgg16_bn")
    p.add_argument("--widths", default="0.25,0.5,0.75,1.0")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="benchmarks/results/elastic.json")
    args = p.parse_args(argv)
    args.widths = tuple(float(w) for w in args.widths.split(","))
    device = resolve_device(args.device)
    rows = []
    for name in args.models.split(","):
        rows += bench_model(name, args, device)
    header = f"{'model':10} {'lvl':>3} {'width':>5} {'MACs':>9} {'ratio':>6} {'sliced ms':>10} {'export ms':>10} {'s/e':>5} {'switch us':>9}"
    print(f"device={device} batch={args.batch} input=3x{args.size}x{args.size} threads={torch.get_num_threads()}")
    print(header)
    for r in rows:
        print(f"{r['model']:10} {r['level']:>3} {r['width']:>5.2f} {r['macs'] / 1e6:>8.1f}M {r['macs_ratio']:>6.3f} "
              f"{r['sliced_ms']:>10.2f} {r['exported_ms']:>10.2f} {r['sliced_over_exported']:>5.2f} {r['switch_us']:>9.2f}")
    worst = max(r["sliced_over_exported"] for r in rows)
    switch = max(r["switch_us"] for r in rows)
    print(f"worst sliced/exported = {worst:.2f} (target <= 1.15); switch = {switch:.2f} us (target < 100)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": str(device), "batch": args.batch, "size": args.size, "torch": torch.__version__, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
