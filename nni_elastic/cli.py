"""Command line: ``nni-elastic train | levels | export``.

``train`` is the main job: it trains an elastic model on a dataset (digits by default, no files
needed), prints the level table (width, MACs, params, latency, accuracy), and writes the elastic
checkpoint, compact exports of every level and an accuracy-vs-MACs plot.
"""
from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from .checkpoint import atomic_save, atomic_write_json
from .device import DEVICES, resolve_device

logger = logging.getLogger("nni_elastic")


def _widths(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(w) for w in text.split(",") if w.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--widths {text!r}: give comma-separated fractions, e.g. 0.25,0.5,1.0") from None


def _print_table(rows: list[dict[str, Any]], title: str, quiet: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    columns = [c for c in ("level", "width", "macs", "macs_ratio", "params", "latency_ms", "accuracy") if any(c in r for r in rows)]
    for c in columns:
        table.add_column(c, justify="right")
    for r in rows:
        table.add_row(*[_fmt(c, r.get(c)) for c in columns])
    Console(file=sys.stdout, width=120).print(table)


def _fmt(column: str, value: Any) -> str:
    if value is None:
        return "-"
    if column in ("macs", "params"):
        return f"{value / 1e6:.3f}M"
    if column in ("macs_ratio", "accuracy"):
        return f"{100 * value:.1f}%"
    if column == "latency_ms":
        return f"{value:.3f}"
    if column == "width" and isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def save_exports(em: Any, out_dir: Path, formats: Sequence[str] = ("torch", "torchscript")) -> list[Path]:
    """Write every level's compact export into ``out_dir`` (pickled module, TorchScript, ONNX)."""
    written = []
    for level in em.levels:
        module = em.export(level.index).cpu()
        example = torch.zeros((1, *em.example_shape[1:]))
        stem = out_dir / f"level{level.index}"
        if "torch" in formats:
            written.append(atomic_save(module, stem.with_suffix(".pt")))
        if "torchscript" in formats:
            scripted = torch.jit.trace(module, example)
            path = stem.with_suffix(".ts")
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            scripted.save(str(tmp))
            tmp.replace(path)
            written.append(path)
        if "onnx" in formats:
            path = stem.with_suffix(".onnx")
            with warnings.catch_warnings():  # the TorchScript exporter is fast and quiet; torch marks it legacy
                warnings.simplefilter("ignore", DeprecationWarning)
                torch.onnx.export(
                    module, (example,), str(path), input_names=["input"], output_names=["logits"],
                    dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False,
                )
            written.append(path)
    return written


def plot_levels(rows: list[dict[str, Any]], path: Path, title: str) -> Optional[Path]:
    """Accuracy vs MACs of the levels, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(r["macs"], r["accuracy"], r["width"]) for r in rows if r.get("accuracy") is not None]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([p[0] / 1e6 for p in pts], [100 * p[1] for p in pts], "o-")
    for macs, acc, width in pts:
        ax.annotate(f"{width:g}" if isinstance(width, float) else "", (macs / 1e6, 100 * acc), textcoords="offset points", xytext=(4, -10))
    ax.set_xlabel("MACs (M, batch 1)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path


def cmd_train(args: argparse.Namespace) -> int:
    from . import ElasticModel, create_model
    from .data import load_dataset
    from .training import TrainConfig, elastic_step, evaluate_levels, train

    device = resolve_device(args.device)
    splits = load_dataset(args.data, root=args.data_root, seed=args.seed, limit=args.limit)
    torch.manual_seed(args.seed)
    model = create_model(args.model, num_classes=splits.num_classes, in_channels=splits.in_channels)
    em = ElasticModel(model, splits.example_inputs(), widths=args.widths, importance=args.importance).to(device)
    cfg = TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed)
    history = train(em, splits.train, splits.val, cfg, step=elastic_step, device=device, quiet=args.quiet, desc=args.model)
    results = evaluate_levels(em, splits.val, device=device)
    em.measure_levels(batch_size=1)
    rows = em.describe()
    for row, res in zip(rows, results):
        row["accuracy"] = res["accuracy"]
    out = Path(args.out)
    em.save(out / "elastic.pt", dataset=args.data, history=history.epochs, accuracy=[r["accuracy"] for r in results])
    exports = save_exports(em, out / "exports")
    atomic_write_json({"model": args.model, "dataset": args.data, "device": str(device), "levels": rows}, out / "levels.json")
    plot = plot_levels(rows, out / "accuracy_vs_macs.png", f"{args.model} on {args.data}")
    if not args.quiet:
        _print_table(rows, f"{args.model} on {args.data}: elastic levels (validation accuracy, latency on {device})", args.quiet)
        print(f"checkpoint: {out / 'elastic.pt'}\nexports:    {len(exports)} files in {out / 'exports'}\nplot:       {plot}")
    return 0


def _load_or_build(args: argparse.Namespace) -> Any:
    from . import ElasticModel, create_model

    if args.checkpoint:
        return ElasticModel.load(args.checkpoint)
    if not args.model:
        raise ValueError("give a checkpoint path or --model NAME")
    shape = (1, args.in_channels, args.input_size, args.input_size)
    model = create_model(args.model, num_classes=args.num_classes, in_channels=args.in_channels)
    return ElasticModel(model, torch.randn(shape), widths=args.widths)


def cmd_levels(args: argparse.Namespace) -> int:
    em = _load_or_build(args).to(resolve_device(args.device))
    if not args.no_latency:
        em.measure_levels(batch_size=args.batch_size)
    rows = em.describe()
    accuracy = getattr(em, "metadata", {}).get("accuracy")
    if accuracy:
        for row, acc in zip(rows, accuracy):
            row["accuracy"] = acc
    if args.json:
        print(__import__("json").dumps(rows, indent=2))
    else:
        _print_table(rows, "elastic levels", False)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    em = _load_or_build(args)
    out = Path(args.out)
    formats = [f.strip() for f in args.formats.split(",")]
    unknown = sorted(set(formats) - {"torch", "torchscript", "onnx"})
    if unknown:
        raise ValueError(f"--formats: unknown format(s) {unknown}; use torch, torchscript, onnx")
    written = save_exports(em, out, formats)
    if not args.quiet:
        for p in written:
            print(p)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nni-elastic", description=__doc__.splitlines()[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true", help="no progress bars or tables")
    common.add_argument("--verbose", action="store_true", help="log details")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", parents=[common], help="train an elastic model and write checkpoint, exports, level table and plot")
    t.add_argument("--model", default="resnet20")
    t.add_argument("--data", default="digits", help="digits | fashion_mnist | cifar10 | imagenette")
    t.add_argument("--data-root", default=None, help="dataset directory (not needed for digits)")
    t.add_argument("--widths", type=_widths, default=(0.25, 0.5, 0.75, 1.0))
    t.add_argument("--importance", default="l1")
    t.add_argument("--epochs", type=int, default=8)
    t.add_argument("--lr", type=float, default=0.05)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--limit", type=int, default=None, help="use at most this many training samples")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="auto", choices=None, help=f"one of {', '.join(DEVICES)}")
    t.add_argument("--out", default="runs/quickstart")
    t.set_defaults(func=cmd_train)

    for name, func, helptext in (("levels", cmd_levels, "print the level table of a checkpoint or zoo model"), ("export", cmd_export, "write compact exports of every level")):
        p = sub.add_parser(name, parents=[common], help=helptext)
        p.add_argument("checkpoint", nargs="?", help="an elastic checkpoint (elastic.pt)")
        p.add_argument("--model", help="a zoo model name instead of a checkpoint")
        p.add_argument("--widths", type=_widths, default=(0.25, 0.5, 0.75, 1.0))
        p.add_argument("--in-channels", type=int, default=3)
        p.add_argument("--num-classes", type=int, default=10)
        p.add_argument("--input-size", type=int, default=32)
        p.add_argument("--device", default="auto")
        p.set_defaults(func=func)
    sub.choices["levels"].add_argument("--batch-size", type=int, default=1, help="batch size of the latency measurement")
    sub.choices["levels"].add_argument("--no-latency", action="store_true")
    sub.choices["levels"].add_argument("--json", action="store_true", help="print JSON instead of a table")
    sub.choices["export"].add_argument("--out", required=True)
    sub.choices["export"].add_argument("--formats", default="torch,torchscript", help="torch, torchscript, onnx")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"nni-elastic {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
