"""``nni-elastic nni register | unregister | meta | trial | subnet-trial``: the NNI adapter on the command line.

Registered by ``nni_elastic.cli`` with ``add_parser(subparsers, [common])``; NNI is imported only
when one of these commands runs. Also runnable alone: ``python -m nni_elastic.nni.cli register``.

    nni-elastic nni register                   # nnictl algo register for OptunaTuner
    nni-elastic nni meta optuna_tuner.yml      # write the meta file: nnictl algo register --meta optuna_tuner.yml
    nni-elastic nni trial --recipe strategies/prune_and_grow/digits.yaml --set data.limit=300
    nni-elastic nni subnet-trial --checkpoint runs/prune_and_grow/digits/elastic.pt --max-macs 0.5 --params '{...}'
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Optional, Sequence

from ..reporting import run_command

__all__ = ["add_parser", "main"]


def cmd_register(args: argparse.Namespace) -> int:
    from ._register import register_tuner

    entry = register_tuner(args.config_dir)
    if not args.quiet:
        print(f"registered NNI tuner {entry['builtinName']} ({entry['className']}) in {entry['registry']}")
        print("use it in an experiment config:  tuner: {name: OptunaTuner, classArgs: {sampler: tpe}}")
    return 0


def cmd_unregister(args: argparse.Namespace) -> int:
    from ._register import registry_file, unregister_tuner

    removed = unregister_tuner(args.config_dir)
    if not args.quiet:
        print(f"{'unregistered' if removed else 'not registered:'} OptunaTuner ({registry_file(args.config_dir)})")
    return 0


def cmd_meta(args: argparse.Namespace) -> int:
    from ._register import tuner_meta_yaml, write_tuner_meta

    if args.path is None:
        print(tuner_meta_yaml(), end="")
    else:
        path = write_tuner_meta(args.path)
        if not args.quiet:
            print(f"wrote {path}; register it with: nnictl algo register --meta {path}")
    return 0


def cmd_trial(args: argparse.Namespace) -> int:
    from ._report import setup_logging
    from .trial import run_from_args

    setup_logging()
    return run_from_args(args, prog="nni-elastic nni trial")


def cmd_subnet_trial(args: argparse.Namespace) -> int:
    from ._report import setup_logging
    from .subnet_trial import run_from_args

    setup_logging()
    return run_from_args(args, prog="nni-elastic nni subnet-trial")


def _has_option(parents: Sequence[argparse.ArgumentParser], option: str) -> bool:
    return any(option in p._option_string_actions for p in parents)


def add_parser(subparsers: Any, parents: Sequence[argparse.ArgumentParser] = ()) -> None:
    """Add the ``nni`` command and its subcommands (``func`` = ``cmd_*``) to an argparse subparsers object."""
    from .subnet_trial import add_arguments as subnet_trial_arguments
    from .trial import add_arguments as trial_arguments

    parents = list(parents)
    top = subparsers.add_parser("nni", help="NNI: register the Optuna tuner, run trials by hand")
    sub = top.add_subparsers(dest="nni_command", required=True)
    r = sub.add_parser("register", parents=parents, help="register OptunaTuner with NNI (nnictl algo register)")
    u = sub.add_parser("unregister", parents=parents, help="remove the OptunaTuner registration")
    for p in (r, u):
        p.add_argument("--config-dir", default=None, help="NNI config directory (default: NNI's; $NNI_CONFIG_DIR)")
    r.set_defaults(func=cmd_register)
    u.set_defaults(func=cmd_unregister)
    m = sub.add_parser("meta", parents=parents, help="print or write the nnictl algo register meta file")
    m.add_argument("path", nargs="?", default=None, help="write it here (default: print it)")
    m.set_defaults(func=cmd_meta)
    t = sub.add_parser("trial", parents=parents, help="run one NNI trial of a recipe (python -m nni_elastic.nni.trial)")
    trial_arguments(t)
    t.set_defaults(func=cmd_trial)
    s = sub.add_parser("subnet-trial", parents=parents,
                       help="evaluate one subnet of a checkpoint as an NNI trial (python -m nni_elastic.nni.subnet_trial)")
    subnet_trial_arguments(s)
    s.set_defaults(func=cmd_subnet_trial)
    for p in (r, u, m):
        if not _has_option(parents, "--quiet"):
            p.add_argument("--quiet", action="store_true", help="print nothing")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m nni_elastic.nni.cli <subcommand>`` (the same as ``nni-elastic nni <subcommand>``)."""
    parser = argparse.ArgumentParser(prog="python -m nni_elastic.nni.cli")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["nni", *(sys.argv[1:] if argv is None else argv)])
    return run_command("nni-elastic nni", lambda: args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
