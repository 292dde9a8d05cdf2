"""Command line: ``nni-elastic run | train | levels | export | tune | search | nni``.

``train`` is the main job: it trains an elastic model on a dataset (digits by default, no files
needed), prints the level table (width, MACs, params, latency, accuracy), and writes the elastic
checkpoint, compact exports of every level and an accuracy-vs-MACs plot.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from .checkpoint import atomic_write_json, ensure_output_dir
from .device import DEVICES, resolve_device
from .elastic import LATENCY_FORMS
from .reporting import DEFAULT_EXPORTS, check_export_formats, plot_levels, print_table, run_command, save_exports
from .config import parse_overrides

logger = logging.getLogger("nni_elastic")

DEFAULT_WIDTHS = (0.25, 0.5, 0.75, 1.0)
TRUST_HELP = ("unpickle a model stored pickled in the checkpoint (a class outside the zoo): this runs code from "
              "the file, so only for files you wrote yourself")


def _widths(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(w) for w in text.split(",") if w.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--widths {text!r}: give comma-separated fractions, e.g. 0.25,0.5,1.0") from None


def cmd_train(args: argparse.Namespace) -> int:
    from . import ElasticModel, create_model
    from .data import load_dataset
    from .training import TrainConfig, elastic_step, evaluate_levels, train

    out = ensure_output_dir(Path(args.out), "--out")
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
    em.save(out / "elastic.pt", dataset=args.data, history=history.epochs, accuracy=[r["accuracy"] for r in results])
    exports = save_exports(em, out / "exports")
    atomic_write_json({"model": args.model, "dataset": args.data, "device": str(device), "levels": rows}, out / "levels.json")
    plot = plot_levels(rows, out / "accuracy_vs_macs.png", f"{args.model} on {args.data}")
    if not args.quiet:
        print_table(rows, f"{args.model} on {args.data}: elastic levels (validation accuracy, latency on {device})")
        print(f"checkpoint: {out / 'elastic.pt'}\nexports:    {len(exports)} files in {out / 'exports'}\nplot:       {plot}")
    return 0


def _torchrun(nproc: int, argv: Sequence[str]) -> int:
    """``nni-elastic run ... --nproc N``: the same command under torchrun with N processes on this machine."""
    import subprocess

    if nproc < 1:
        raise ValueError(f"--nproc {nproc}: give the number of processes, 1 or more")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("--nproc inside a torchrun process: drop --nproc (torchrun already started the processes)")
    rest, skip = [], False
    for arg in argv:  # the command again, without --nproc
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            rest.append(arg)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "nni_elastic.cli", *rest]
    logger.info("starting %s", " ".join(cmd))
    return subprocess.call(cmd)


def cmd_run(args: argparse.Namespace) -> int:
    from . import distributed as dist
    from .config import load_recipe
    from .runner import run_recipe

    overrides = parse_overrides(args.set)
    if args.device:
        overrides["device"] = args.device
    recipe = load_recipe(args.recipe, overrides)  # a bad recipe fails here, once, before any process starts
    if args.nproc is not None and args.nproc != 1:
        return _torchrun(args.nproc, args.argv)
    started = dist.setup_from_env(recipe.device)
    main = dist.is_main()
    try:
        result = run_recipe(recipe, output=args.out, resume=args.resume, quiet=args.quiet or not main)
        dist.barrier()  # rank 0 writes the files; the run ends when they are written
    finally:
        if started:
            dist.teardown()
    if not args.quiet and main:
        timing = result.records.get("latency") if isinstance(result.records, dict) else None
        where = (f"latency: {timing['form']} form, batch {timing['batch_size']} of {timing['input']}, {timing['device']}"
                 if timing else f"latency on {resolve_device(recipe.device)}")
        print_table(result.rows, f"{recipe.model.name} on {recipe.data.name}: {recipe.method} levels "
                    f"(validation accuracy, {where})")
        if "full_epochs" in result.compute:
            print(f"training compute: {result.compute['full_epochs']:.2f} full-model epochs")
        print(f"output: {result.output} (checkpoints/, levels.json, accuracy_vs_macs.png"
              f"{', elastic.pt' if result.elastic_model is not None else ''}{', exports/' if result.exports else ''})")
    return 0


def _load_or_build(args: argparse.Namespace) -> Any:
    from . import ElasticModel, create_model

    if args.checkpoint:
        if args.model or args.widths is not None:
            given = "--model" if args.model else "--widths"
            raise ValueError(f"{given} applies to a zoo model, not to the checkpoint {args.checkpoint}: its levels were "
                             f"trained with it; drop {given}, or use --model NAME --widths ... without a checkpoint")
        return ElasticModel.load(args.checkpoint, trust=args.trust_checkpoint)
    if not args.model:
        raise ValueError("give a checkpoint path or --model NAME")
    shape = (1, args.in_channels, args.input_size, args.input_size)
    model = create_model(args.model, num_classes=args.num_classes, in_channels=args.in_channels)
    return ElasticModel(model, torch.randn(shape), widths=args.widths or DEFAULT_WIDTHS)


def cmd_levels(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    em = _load_or_build(args).to(device)
    title = "elastic levels"
    if not args.no_latency:
        from .elastic import latency_key

        key = latency_key(device, args.batch_size, args.form)
        for level in em.levels:  # measurements saved with the checkpoint are reused
            if key not in level.latency:
                em.measure_latency(level.index, batch_size=args.batch_size, form=args.form)
            level.latency_ms = level.latency[key]
        title = f"elastic levels (latency: {args.form} form, batch {args.batch_size}, {device})"
    rows = em.describe()
    accuracy = getattr(em, "metadata", {}).get("accuracy")
    if accuracy:
        for row, acc in zip(rows, accuracy):
            row["accuracy"] = acc
    if args.json:
        print(__import__("json").dumps(rows, indent=2))
    else:
        print_table(rows, title)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    try:
        check_export_formats(formats, args.deploy)
    except ValueError as exc:
        raise ValueError(f"--formats: {exc}") from None
    out = Path(args.out)
    if out.exists() and not out.is_dir():  # before loading: a typo should not cost a model load
        ensure_output_dir(out, "--out")
    em = _load_or_build(args)
    written = save_exports(em, ensure_output_dir(out, "--out"), formats, deploy=args.deploy, batch_size=args.batch_size)
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

    r = sub.add_parser("run", parents=[common], help="run a strategy recipe (strategies/<method>/<recipe>.yaml)")
    r.add_argument("recipe", help="a YAML recipe, e.g. strategies/prune_and_grow/digits.yaml")
    r.add_argument("--out", default=None, help="output directory (default: the recipe's output)")
    r.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe key, e.g. strategy.grow_epochs=1")
    r.add_argument("--device", default=None, help="auto | cpu | cuda (overrides the recipe)")
    r.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="train with N processes on this machine (torchrun + DistributedDataParallel: gloo on CPU, "
                        "NCCL on GPUs, one GPU each); for several machines call torchrun yourself")
    r.set_defaults(func=cmd_run)

    for name, func, helptext in (("levels", cmd_levels, "print the level table of a checkpoint or zoo model"), ("export", cmd_export, "write compact exports of every level")):
        p = sub.add_parser(name, parents=[common], help=helptext)
        p.add_argument("checkpoint", nargs="?", help="an elastic checkpoint (elastic.pt)")
        p.add_argument("--model", help="a zoo model name instead of a checkpoint")
        p.add_argument("--widths", type=_widths, default=None, help="levels of a --model (default 0.25,0.5,0.75,1.0)")
        p.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
        p.add_argument("--in-channels", type=int, default=3)
        p.add_argument("--num-classes", type=int, default=10)
        p.add_argument("--input-size", type=int, default=32)
        p.add_argument("--device", default="auto")
        p.set_defaults(func=func)
    sub.choices["levels"].add_argument("--batch-size", type=int, default=1, help="batch size of the latency measurement")
    sub.choices["levels"].add_argument("--no-latency", action="store_true")
    sub.choices["levels"].add_argument(
        "--form", default="deploy", choices=LATENCY_FORMS,
        help="how each level runs when timed: deploy export (default), prepared or plain sliced forward, plain export")
    sub.choices["levels"].add_argument("--json", action="store_true", help="print JSON instead of a table")
    sub.choices["export"].add_argument("--out", required=True)
    sub.choices["export"].add_argument(
        "--formats", default=",".join(DEFAULT_EXPORTS),
        help="pt2 (torch.export program), onnx, torchscript (.ts), state (.state.pt: weights + architecture, "
             "nni_elastic.load_compact); torch (.pt, a pickled module: loading it runs code, so only on request)")
    sub.choices["export"].add_argument(
        "--deploy", action="store_true",
        help="fold BatchNorm into the layer before it and pick the memory format by measuring (formats pt2, onnx, "
             "torchscript or torch)")
    sub.choices["export"].add_argument("--batch-size", type=int, default=1, help="batch the deploy export is tuned for")

    from .optuna.cli import add_parser as add_optuna_commands  # light: Optuna loads only when tune/search runs

    add_optuna_commands(sub, [common])

    from .nni.cli import add_parser as add_nni_commands  # light: NNI loads only when an nni command runs

    add_nni_commands(sub, [common])
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run_command(f"nni-elastic {args.command}", lambda: args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
