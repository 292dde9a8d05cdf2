"""Levels at deployment speed: sliced, prepared (``prepare_inference``), plain export, deploy export.

Per level of ResNet-20, VGG-16-BN and MobileNetV2-style (batch 64, 3x32x32 by default; optionally
torchvision's ResNet-18 at 224x224, batch 8), at 1 and 2 threads. The four forms of a level are
timed interleaved, round after round, so their ratios are robust to machine noise. Targets: the
deploy export of every level >= 1.4x faster than the plain export of the same level (ResNet-20,
VGG-16-BN, batch 64); the prepared forward <= 1.10x the deploy export; switch < 100 us.

With ``--compile`` the deploy export compiled by ``torch.compile`` (weights frozen) is timed too.
Large 3x3 convolutions timed in the same rounds give this machine's FP32 convolution rate; a
level's ``ceiling_speedup`` (that rate / the plain export's GFLOP/s) bounds what any FP32 runtime
could gain on it, and the summary lists the levels where 1.4x is beyond that bound.

    python benchmarks/bench_deploy.py --out benchmarks/results/deploy.json
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import nni_elastic as ne
from nni_elastic.checkpoint import atomic_write_json
from nni_elastic.measure import median_ms


def _torchvision_resnet18():
    import types

    for name in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
        sys.modules.setdefault(name, types.ModuleType(name))
    import torchvision

    return torchvision.models.resnet18(weights=None, num_classes=10)


def build(name: str) -> tuple[torch.nn.Module, tuple[int, ...]]:
    if name == "tv_resnet18":
        return _torchvision_resnet18(), (3, 224, 224)
    return ne.create_model(name, num_classes=10, in_channels=3), (3, 32, 32)


def _onnxruntime(module: torch.nn.Module, x: torch.Tensor, threads: int):
    """A runner of ``module`` exported to ONNX under ONNX Runtime (``.[onnx]``), or None without it."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    import io
    import warnings

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(copy.deepcopy(module).to(memory_format=torch.contiguous_format),
                          (x,), buffer, input_names=["input"], output_names=["logits"], dynamo=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
    feed = {"input": x.numpy()}
    return lambda: session.run(None, feed)


def _reference_convs(batch: int) -> list[tuple[float, object]]:
    """(GFLOP, runner) of large 3x3 convolutions (VGG-like widths, channels-last and contiguous):
    the best of them, timed beside the levels, is this machine's FP32 convolution throughput."""
    out = []
    for c, hw in ((256, 8), (512, 4), (512, 8)):
        conv = torch.nn.Conv2d(c, c, 3, padding=1).eval()
        x = torch.randn(batch, c, hw, hw)
        gflop = 2 * c * c * 9 * hw * hw * batch / 1e9
        out.append((gflop, lambda conv=conv, x=x: conv(x)))
        last = torch.nn.Conv2d(c, c, 3, padding=1).eval().to(memory_format=torch.channels_last)
        xl = x.contiguous(memory_format=torch.channels_last)
        out.append((gflop, lambda conv=last, x=xl: conv(x)))
    return out


def bench_model(name: str, batch: int, threads: int, rounds: int, repeats: int, compile: bool = False) -> list[dict]:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, shape = build(name)
    model.train()
    with torch.no_grad():
        for _ in range(3):  # non-trivial BatchNorm statistics
            model(torch.randn(4, *shape))
    em = ne.ElasticModel(model, torch.randn(1, *shape)).eval()
    x = torch.randn(batch, *shape)
    sliced_em = copy.deepcopy(em)  # the ordinary sliced forward, without the prepared forms
    start = time.perf_counter()
    info = em.prepare_inference(batch_size=batch)
    prepare_s = time.perf_counter() - start
    full_macs = em.levels[-1].macs
    switch_us = median_ms(lambda: em.set_level(0), repeats=20, warmup=2) * 1000.0
    refs = _reference_convs(batch)
    rows = []
    for level in em.levels:
        plain = em.export(level.index)
        deployed = em.export(level.index, deploy=True, batch_size=batch)
        fmt = deployed.nni_elastic_deploy["memory_format"]
        xd = x.contiguous(memory_format=torch.channels_last) if fmt == "channels_last" else x
        em.set_level(level.index)
        sliced_em.set_level(level.index)
        with torch.inference_mode():
            em(x)  # a stale or lazy level is prepared here, not timed
        ort_run = _onnxruntime(deployed, x, threads)
        forms = {
            "sliced": lambda: sliced_em(x),
            "prepared": lambda: em(x),
            "plain_export": lambda: plain(x),
            "deploy_export": lambda: deployed(xd),
        }
        if ort_run is not None:
            forms["onnxruntime"] = ort_run
        if compile:
            compiled = em.export(level.index, deploy=True, batch_size=batch, memory_format=fmt, compile=True)
            forms["compiled_deploy"] = lambda: compiled(xd)
        for i, (_, run) in enumerate(refs):
            forms[f"ref{i}"] = run
        times: dict[str, list[float]] = {k: [] for k in forms}
        with torch.inference_mode():
            for _ in range(rounds):
                for key, run in forms.items():
                    times[key].append(median_ms(run, repeats=repeats, warmup=1))
        med = {k: statistics.median(v) for k, v in times.items()}
        # FP32 roofline: the level's FLOPs at the best measured convolution rate
        peak = max(gflop / (med.pop(f"ref{i}") / 1e3) for i, (gflop, _) in enumerate(refs))
        gflop = 2 * level.macs * batch / 1e9
        plain_rate = gflop / (med["plain_export"] / 1e3)
        rows.append({
            "model": name, "threads": threads, "batch": batch, "level": level.index, "width": level.width,
            "macs_ratio": level.macs / full_macs, **{f"{k}_ms": v for k, v in med.items()},
            "onnxruntime_speedup": med["plain_export"] / med["onnxruntime"] if "onnxruntime" in med else None,
            "deploy_speedup": med["plain_export"] / med["deploy_export"],
            "compiled_speedup": med["plain_export"] / med["compiled_deploy"] if "compiled_deploy" in med else None,
            "peak_conv_gflops": peak, "plain_gflops": plain_rate,
            "deploy_gflops": gflop / (med["deploy_export"] / 1e3),
            "ceiling_speedup": peak / plain_rate,
            "prepared_over_deploy": med["prepared"] / med["deploy_export"],
            "memory_format": fmt, "folded": len(deployed.nni_elastic_deploy["folded"]),
            "switch_us": switch_us, "prepare_s": prepare_s, "prepared_bytes": info["bytes"],
        })
    full = rows[-1]["plain_export_ms"]
    for r in rows:  # speedup over the full plain export, as a fraction of the MACs ratio's ideal
        r["deploy_fraction_of_macs_ideal"] = full / r["deploy_export_ms"] * r["macs_ratio"]
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet20,vgg16_bn,mobilenetv2_tiny")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tv-resnet18", action="store_true", help="also torchvision's ResNet-18 at 224x224, batch 8")
    p.add_argument("--compile", action="store_true", help="also the deploy export compiled (torch.compile, frozen weights)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--out", default="benchmarks/results/deploy.json")
    args = p.parse_args(argv)
    jobs = [(m, args.batch) for m in args.models.split(",") if m]
    if args.tv_resnet18:
        jobs.append(("tv_resnet18", 8))
    rows = []
    for threads in [int(t) for t in args.threads.split(",")]:
        for name, batch in jobs:
            rows += bench_model(name, batch, threads, args.rounds, args.repeats, args.compile)
    header = (f"{'model':16s} thr lvl width  MACs  sliced prepared  export  deploy  dep-speedup comp-speedup "
              f"ort-speedup ceiling GFLOP/s(plain/deploy/peak) prep/dep fmt")
    if not args.quiet:
        print(header)
        for r in rows:
            opt = lambda v: f"{v:.2f}" if v is not None else "-"  # noqa: E731
            print(f"{r['model']:16s} {r['threads']:3d} {r['level']:3d} {r['width']:5.2f} {r['macs_ratio']:5.3f} "
                  f"{r['sliced_ms']:7.2f} {r['prepared_ms']:8.2f} {r['plain_export_ms']:7.2f} {r['deploy_export_ms']:7.2f} "
                  f"{r['deploy_speedup']:11.2f} {opt(r['compiled_speedup']):>12s} {opt(r['onnxruntime_speedup']):>11s} "
                  f"{r['ceiling_speedup']:7.2f} {r['plain_gflops']:6.1f}/{r['deploy_gflops']:6.1f}/{r['peak_conv_gflops']:6.1f}"
                  f"        {r['prepared_over_deploy']:8.2f} {r['memory_format']}")
    target = [r for r in rows if r["model"] in ("resnet20", "vgg16_bn") and r["batch"] == 64]
    summary = {
        "deploy_speedup_min_resnet20_vgg16": min((r["deploy_speedup"] for r in target), default=None),
        "prepared_over_deploy_max": max(r["prepared_over_deploy"] for r in rows),
        "switch_us_max": max(r["switch_us"] for r in rows),
    }
    best = lambda r: max(v for v in (r["deploy_speedup"], r["compiled_speedup"]) if v is not None)  # noqa: E731
    summary["best_speedup_min_resnet20_vgg16"] = min((best(r) for r in target), default=None)
    # a level the 1.4x target cannot reach in FP32 here: 1.4x its plain speed exceeds the best convolution rate
    summary["beyond_fp32_ceiling"] = [f"{r['model']}/t{r['threads']}/level{r['level']}: ceiling {r['ceiling_speedup']:.2f}x"
                                      for r in target if r["ceiling_speedup"] < 1.4]
    summary["targets"] = {
        "deploy_speedup_ge_1.4": summary["deploy_speedup_min_resnet20_vgg16"] is not None
        and summary["deploy_speedup_min_resnet20_vgg16"] >= 1.4,
        "prepared_le_1.10_deploy": summary["prepared_over_deploy_max"] <= 1.10,
        "switch_lt_100us": summary["switch_us_max"] < 100,
    }
    print(json.dumps(summary, indent=1))
    out = Path(args.out)
    atomic_write_json({"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "rows": rows, "summary": summary}, out)
    _plot(rows, out.with_suffix(".png"))
    return 0


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [(m, t) for m, t in dict.fromkeys((r["model"], r["threads"]) for r in rows)]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.5), squeeze=False)
    for ax, (model, threads) in zip(axes[0], keys):
        sub = [r for r in rows if r["model"] == model and r["threads"] == threads]
        for form in ("sliced", "prepared", "plain_export", "deploy_export", "onnxruntime"):
            if all(f"{form}_ms" in r for r in sub):
                ax.plot([r["macs_ratio"] for r in sub], [r[f"{form}_ms"] for r in sub], marker="o", label=form)
        ax.set_title(f"{model}, {threads} thread(s)")
        ax.set_xlabel("MACs / full")
        ax.set_ylabel("ms per batch")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
