"""Run a recipe end to end: data, model, strategy, checkpoints, exports, table, plot.

The one place that turns a validated :class:`~nni_elastic.config.Recipe` into a run; the CLI
(``nni-elastic run``), the NNI trial entry and the Optuna studies all call :func:`run_recipe`.

Output directory layout::

    <output>/recipe.yaml            the resolved recipe
    <output>/checkpoints/           a checkpoint after every strategy step (for --resume)
    <output>/elastic.pt             the final elastic model (every level)
    <output>/exports/level{i}.ts|.state.pt compact, physically pruned models per level (TorchScript; weights + architecture)
    <output>/levels.json            the level table (width, MACs, params, accuracy, latency)
    <output>/accuracy_vs_macs.png   the plot
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import yaml

from .checkpoint import atomic_write_json, atomic_write_text, ensure_output_dir, remove_stale_temps
from .config import Recipe, RecipeError, recipe_differences
from .data import load_dataset
from .device import resolve_device
from .elastic import ElasticModel
from .models import create_model
from .reporting import plot_levels, save_exports
from .strategies import ExpansionGrowth, PruneAndGrow, StepInfo

__all__ = ["RunResult", "build_strategy", "run_recipe"]

logger = logging.getLogger(__name__)


@dataclass
class RunResult:
    """What a run produced: the elastic model, the level rows, the output paths."""

    elastic_model: Optional[ElasticModel]
    rows: list[dict[str, Any]]
    output: Path
    compute: dict[str, float]
    records: dict[str, Any]


def build_strategy(recipe: Recipe, *, checkpoint_dir: Optional[Path] = None, quiet: bool = False,
                   on_step_end: Optional[Callable[[StepInfo], Any]] = None) -> PruneAndGrow | ExpansionGrowth:
    """The strategy object a recipe describes."""
    s = recipe.strategy_section()
    t, e = recipe.train, recipe.elastic
    if recipe.method == "expansion_growth":
        return ExpansionGrowth(
            threshold=s.threshold, check_every=s.check_every, warmup_steps=s.warmup_steps, max_params=s.max_params,
            max_macs=s.max_macs, damping=s.damping, size_penalty=s.size_penalty, score_batch=s.score_batch,
            candidates=tuple(s.candidates), width_fraction=s.width_fraction, epochs=s.epochs, lr=t.lr,
            batch_size=t.batch_size, optimizer=t.optimizer, momentum=t.momentum, weight_decay=t.weight_decay,
            seed=recipe.seed, device=recipe.device, quiet=quiet, checkpoint_dir=checkpoint_dir, on_step_end=on_step_end,
        )
    return PruneAndGrow(
        widths=e.widths, importance=e.importance, bn=e.bn, ignored_layers=e.ignored_layers, round_to=e.round_to,
        prune_steps=s.prune_steps, pretrain_epochs=s.pretrain_epochs, finetune_epochs=s.finetune_epochs,
        grow_epochs=s.grow_epochs, grow_mode=s.grow_mode, regrow=s.regrow, finetune_lr=s.finetune_lr, grow_lr=s.grow_lr,
        calibrate_batches=s.calibrate_batches, lr=t.lr, batch_size=t.batch_size, optimizer=t.optimizer,
        momentum=t.momentum, weight_decay=t.weight_decay, seed=recipe.seed, device=recipe.device, quiet=quiet,
        checkpoint_dir=checkpoint_dir, on_step_end=on_step_end,
    )


def run_recipe(
    recipe: Recipe,
    *,
    output: Optional[str | Path] = None,
    resume: bool = False,
    quiet: bool = False,
    exports: bool = True,
    on_step_end: Optional[Callable[[StepInfo], Any]] = None,
) -> RunResult:
    """Train what the recipe says and write checkpoint, exports, level table and plot.

    Args:
        recipe: a validated recipe (:func:`nni_elastic.config.load_recipe`).
        output: output directory (default: ``recipe.output``).
        resume: continue an interrupted run in the same output directory.
        quiet: no progress bars.
        exports: write compact exports of every level.
        on_step_end: called after every strategy step (e.g. NNI intermediate results).
    """
    out = Path(output if output is not None else recipe.output)
    if out.exists() and not out.is_dir():
        raise RecipeError(f"output {str(out)!r} is a file; pass --out <a directory> (or set output: in the recipe)")
    if resume:
        _check_resumable(recipe, out)  # before anything is written
    device = resolve_device(recipe.device)
    ckpt = out / "checkpoints"
    if resume and not (ckpt / "elastic.pt").is_file() and not (ckpt / "pretrain.pt").is_file():
        logger.warning("--resume: no checkpoint in %s; starting from the beginning", ckpt)
    d = recipe.data
    splits = load_dataset(d.name, root=d.root, val_fraction=d.val_fraction, seed=d.seed, image_size=d.image_size, limit=d.limit)
    torch.manual_seed(recipe.seed)
    model = create_model(recipe.model.name, num_classes=splits.num_classes, in_channels=splits.in_channels, **recipe.model.kwargs)
    ensure_output_dir(out, "output")  # only once the recipe has proved buildable: a bad one writes nothing
    for folder in (out, out / "checkpoints", out / "exports"):
        remove_stale_temps(folder)  # left by a run killed while writing
    atomic_write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False), out / "recipe.yaml")
    strategy = build_strategy(recipe, checkpoint_dir=ckpt, quiet=quiet, on_step_end=on_step_end)
    title = f"{recipe.model.name} on {d.name}: {recipe.method}"
    if isinstance(strategy, ExpansionGrowth):
        return _finish_growth(recipe, strategy, model, splits, out, resume, device, title)
    em = strategy.fit(model, splits.train, splits.val, resume=resume, example_inputs=splits.example_inputs())
    rows = strategy.report()
    em.save(out / "elastic.pt", recipe=recipe.to_dict(), accuracy=[r["accuracy"] for r in rows], report=rows)
    if exports:
        save_exports(em, out / "exports")
    atomic_write_json({"recipe": recipe.source, "method": recipe.method, "model": recipe.model.name, "dataset": d.name,
                       "device": str(device), "compute": strategy.compute_, "levels": rows}, out / "levels.json")
    plot_levels(rows, out / "accuracy_vs_macs.png", title)
    return RunResult(em, rows, out, strategy.compute_, strategy.records_)


def _check_resumable(recipe: Recipe, out: Path) -> None:
    """Refuse to resume a run with another recipe: it would mix two runs and relabel the result."""
    stored_path = out / "recipe.yaml"
    if not stored_path.is_file():
        return
    try:
        stored = yaml.safe_load(stored_path.read_text()) or {}
    except yaml.YAMLError:
        raise RecipeError(f"--resume: {stored_path} is not valid YAML; restore it or start a new run with another --out") from None
    diff = recipe_differences(stored, recipe.to_dict())
    if diff:
        changes = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
        raise RecipeError(f"--resume: the recipe differs from the interrupted run's ({stored_path}) in {changes}; "
                          f"resume with the same recipe and --set values, or start a new run with another --out")


def _finish_growth(recipe: Recipe, strategy: ExpansionGrowth, model: torch.nn.Module, splits: Any, out: Path,
                   resume: bool, device: torch.device, title: str) -> RunResult:
    """Expansion growth: one checkpoint per complexity level (in ``checkpoints/``), table and plot."""
    result = strategy.fit(model, splits.train, splits.val, resume=resume, example_inputs=splits.example_inputs())
    rows = [dict(r, width=None) for r in strategy.report()]
    em = None
    if result.widths_only and result.expansions:
        em = result.elastic_model(splits.example_inputs().to(device))
        em.save(out / "elastic.pt", recipe=recipe.to_dict(), growth=rows)
    atomic_write_json({"recipe": recipe.source, "method": recipe.method, "model": recipe.model.name,
                       "dataset": recipe.data.name, "device": str(device), "checkpoints": rows,
                       "expansions": result.expansions, "checks": strategy.checks_}, out / "levels.json")
    plot_levels(rows, out / "accuracy_vs_macs.png", title)
    return RunResult(em, rows, out, {}, {"expansions": result.expansions, "checks": strategy.checks_})
