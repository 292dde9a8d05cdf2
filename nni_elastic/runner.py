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

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import yaml

from .checkpoint import atomic_write_json, atomic_write_text, ensure_output_dir, remove_stale_temps
from .config import Recipe, RecipeError, recipe_differences
from .data import load_dataset
from .device import resolve_device
from .distributed import is_main
from .elastic import ElasticModel
from .models import create_model
from .reporting import plot_levels, save_exports
from .strategies import StepInfo, Strategy, get_strategy

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
    exports: list[Path] = field(default_factory=list)


def build_strategy(recipe: Recipe, *, checkpoint_dir: Optional[Path] = None, quiet: bool = False,
                   on_step_end: Optional[Callable[[StepInfo], Any]] = None) -> Strategy:
    """The strategy object a recipe describes: its ``method`` from the registry, its sections whole."""
    cls = get_strategy(recipe.method)
    return cls(options=recipe.strategy, train=recipe.train_config(), elastic=recipe.elastic, device=recipe.device,
               quiet=quiet, checkpoint_dir=checkpoint_dir, on_step_end=on_step_end)


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
        exports: write compact exports of every level (when the strategy yields an elastic model).
        on_step_end: called after every strategy step (e.g. NNI intermediate results).
    """
    out = Path(output if output is not None else recipe.output)
    if out.exists() and not out.is_dir():
        raise RecipeError(f"output {str(out)!r} is a file; pass --out <a directory> (or set output: in the recipe)")
    if resume:
        _check_resumable(recipe, out)  # before anything is written
    device = resolve_device(recipe.device)
    ckpt = out / "checkpoints"
    if resume and not any(ckpt.glob("*.pt")):
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
    result = strategy.run(model, splits.train, splits.val, resume=resume, example_inputs=splits.example_inputs())
    em, rows = result.elastic_model, result.rows
    written: list[Path] = []
    if not is_main():  # several processes hold the same result; rank 0 writes it
        return RunResult(em, rows, out, result.compute, result.records, written)
    if em is not None:
        em.save(out / "elastic.pt", recipe=recipe.to_dict(), **result.metadata)
        if exports:
            written = save_exports(em, out / "exports")
    atomic_write_json({"recipe": recipe.source, "method": recipe.method, "model": recipe.model.name, "dataset": d.name,
                       "device": str(device), "compute": result.compute, "levels": rows,
                       "checkpoints": result.checkpoints, **_plain(result.records)}, out / "levels.json")
    plot_levels(rows, out / "accuracy_vs_macs.png", f"{recipe.model.name} on {d.name}: {recipe.method}")
    return RunResult(em, rows, out, result.compute, result.records, written)


def _plain(records: dict[str, Any]) -> dict[str, Any]:
    """The JSON-able entries of a strategy's records (levels.json holds plain data only)."""
    out = {}
    for key, value in records.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            continue
        out[key] = value
    return out


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
