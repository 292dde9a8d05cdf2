"""Prune-and-grow (Mangal, Kalra, Sapra, arXiv 2505.11569): nested levels by pruning, then rebuilding.

The thesis (its Figure 3.1, "iterative pruning and rebuilding process") compresses a trained CNN by
structured pruning steps down to a compact core and then rebuilds it level by level, so the small
networks are nested in the large one. Here every step works on one :class:`ElasticModel`:

1. ``pretrain``: train the full network (skip with ``pretrain_epochs=0`` for a trained model).
2. ``wrap``: trace channel groups with torch-pruning and order channels by importance.
3. ``prune_*``: from the full width down to the smallest level, one step per target width: re-rank
   the channels still kept (importance on the current weights, as the thesis re-scores before each
   step), drop the least important ones (the level keeps a prefix), fine-tune the kept channels.
   Pruned channels keep their weights untouched (the thesis stores them as "metadata" to restore).
4. ``grow_*``: from the core upward, re-enable the next level's channels (``regrow="restore"``:
   their stored weights; ``"reinit"``: fresh initialisation) and train them:
   ``grow_mode="freeze"`` trains only the new channels; every smaller level stays bit-identical
   (the thesis freezes the core; we enforce it exactly: a snapshot restore after each optimizer
   step, since gradient masking alone lets weight decay and momentum move frozen weights).
   ``grow_mode="joint"`` trains the new level with the smaller ones by the sandwich rule with
   in-place distillation (Yu & Huang 2019); levels stay nested (prefixes) and share weights.
5. ``calibrate``: recompute each level's BatchNorm statistics (one set per level) and evaluate; in
   ``freeze`` mode only those of levels that never trained on their own, so every built level
   stays bit-identical (see ``PruneAndGrow._stale_levels``).

Deviations from the thesis, with reasons: levels live in one model and switch at runtime instead
of being separate model objects; prune ratios are given as the target level widths (plus optional
intermediate steps) so that every level is a pruning point; the default grow mode is ``joint``
(better nested accuracy in our Fashion-MNIST benchmark, see benchmarks/README.md); the thesis's
setting (frozen core, restored weights) is ``grow_mode="freeze", regrow="restore"``.

Example:
    >>> pg = PruneAndGrow(widths=(0.25, 0.5, 0.75, 1.0), importance="l1", prune_steps=4,
    ...                   finetune_epochs=2, grow_epochs=3)
    >>> em = pg.fit(model, train_data, val_data).elastic_model
    >>> print(pg.report())
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..checkpoint import CheckpointError, atomic_save, read_checkpoint
from ..device import resolve_device
from ..distributed import from_main, is_main
from ..budget import Budgets, allocate, parse_levels
from ..elastic import ElasticModel, check_widths
from ..graph import GRADIENT_IMPORTANCES
from ..options import check_options, option
from ..training import (FORWARD_COST, IndexedDataset, TrainConfig, distill_step, elastic_step, evaluate_levels, plain_step,
                        predictions, seed_everything, train)
from ._base import (ElasticOptions, ParameterGuard, Step, StepInfo, Strategy, StrategyResult, example_from,
                    first_batches, num_samples, register_strategy)

__all__ = ["PruneAndGrow", "PruneAndGrowOptions", "GROW_MODES", "REGROW_MODES"]

logger = logging.getLogger(__name__)

GROW_MODES = ("freeze", "joint")
REGROW_MODES = ("restore", "reinit")


@dataclass
class PruneAndGrowOptions:
    """Settings of prune-and-grow (the recipe's ``strategy:`` section); see :class:`PruneAndGrow`."""

    pretrain_epochs: int = option(0, ge=0)
    prune_steps: int = option(3, gt=0)
    finetune_epochs: int = option(1, ge=0)
    core_epochs: Optional[int] = option(None, ge=0)
    grow_epochs: int = option(2, ge=0)
    final_grow_epochs: Optional[int] = option(None, ge=0)
    final_grow_levels: int = option(1, ge=1)
    path_samples: int = option(0, ge=0)
    grow_mode: str = option("joint", choices=GROW_MODES)
    regrow: str = option("restore", choices=REGROW_MODES)
    finetune_lr: Optional[float] = option(None, gt=0)
    grow_lr: Optional[float] = option(None, gt=0)
    calibrate_batches: int = option(20, ge=0)
    distill: float = option(0.0, ge=0, le=1)
    distill_temperature: float = option(4.0, gt=0)

    def __post_init__(self) -> None:
        check_options(self)


@register_strategy("prune_and_grow")
class PruneAndGrow(Strategy):
    """Prune a CNN down to a compact core, then grow it back level by level into an ElasticModel.

    Args:
        widths: level widths in (0, 1], strictly increasing (smallest = the core).
        levels: instead of widths, budgets the levels must fit (``ne.budgets(macs=[...])``,
            ``ne.budgets(latency_ms=[...], batch_size=64)``, or the recipe form
            ``{"macs": [...]}``): per-group widths are chosen at the wrap
            (:func:`nni_elastic.budget.allocate`) and each level is reported next to its budget.
        importance: channel ranking (``"l1"``, ``"l2"``, ``"bn"``, ``"taylor"``, ...).
        prune_steps: pruning steps from the full width down to the core; at least one per level
            below the full width; extra steps insert intermediate widths in the largest gaps.
        pretrain_epochs: epochs of training the full network first (0 for a trained model).
        finetune_epochs: fine-tuning epochs after each pruning step.
        core_epochs: fine-tuning epochs of the last pruning step, the one that reaches the core
            (default ``finetune_epochs``). The core costs a fraction of an epoch of the full
            network per epoch; the thesis fine-tunes its cores for 25 epochs. With
            ``grow_mode="freeze"`` the core is final after this step.
        grow_epochs: training epochs per rebuilt level.
        final_grow_epochs: epochs of the last grow step (the largest level; with
            ``grow_mode="joint"`` every level trains in it by the sandwich rule); default
            ``grow_epochs``. A short pretraining and a long final joint step spend the compute
            where all levels share it (see benchmarks/README.md, frontier).
        final_grow_levels: with ``grow_mode="freeze"``, how many of the largest levels train
            together in the last grow step, by the sandwich rule (the largest on the labels, the
            others distilled from it in place), on their channels above the level under them:
            1 (default) trains only the full level's new channels; 2 also lets the full level
            adapt the channels that the level under it added, which that level then learns
            with it (no ``distill`` teacher in that step). Levels below those stay
            bit-identical; the core never trains again.
        path_samples: with ``grow_mode="joint"``, random points between two consecutive levels
            (each group's channels interpolated at one random fraction) also trained per batch,
            distilled from the largest level as the levels are; so ``ElasticModel.add_level``
            points between levels are trained points, not untrained combinations.
        distill: weight in [0, 1] of distillation from the trained full network (its logits before
            any pruning, computed once over the training set; Hinton et al. 2015) in the one-level
            phases: the pruning fine-tunes and, with ``grow_mode="freeze"``, the grow steps (joint
            grow steps distil from their largest level in place). 0 (default): labels only.
        distill_temperature: softmax temperature of that distillation.
        grow_mode: ``"joint"`` (sandwich rule over the levels built so far) or ``"freeze"``
            (only the new channels train; smaller levels stay bit-identical, except those that
            ``final_grow_levels`` > 1 trains in the last step).
        regrow: ``"restore"`` the pruned weights or ``"reinit"`` the re-enabled channels.
        lr, finetune_lr, grow_lr: learning rates (pretraining, fine-tuning, growing; the latter
            two default to ``lr / 5`` and ``lr / 2``).
        batch_size, optimizer, momentum, weight_decay: training settings.
        bn: ``"per_level"`` or ``"shared"`` BatchNorm statistics.
        ignored_layers: module paths whose output channels never shrink.
        calibrate_batches: batches for the final BatchNorm recalibration of each level (0: none); with
            ``grow_mode="freeze"`` only levels that never trained on their own are recalibrated.
        seed, device, quiet: reproducibility, ``auto|cpu|cuda``, progress display.
        checkpoint_dir: where a checkpoint is written after every step (needed for ``resume``).
        on_step_end: called with a :class:`StepInfo` after each step (e.g. to report to NNI).

    The settings are three typed objects, each given whole or field by field:
    :class:`PruneAndGrowOptions` (``options=``), :class:`~nni_elastic.training.TrainConfig`
    (``train=``: lr, batch size, optimizer, momentum, weight decay, seed) and
    :class:`~nni_elastic.strategies.ElasticOptions` (``elastic=``: widths, importance, bn,
    ignored_layers, round_to).
    """

    Options = PruneAndGrowOptions

    def __init__(self, widths: Optional[Sequence[float]] = None, *,
                 levels: Optional[Union[Budgets, dict]] = None, **settings: Any) -> None:
        if widths is not None:
            settings["widths"] = check_widths(widths)  # its own messages for the Python API
        if levels is not None:
            settings["levels"] = parse_levels(levels, where="levels").to_dict()
        super().__init__(**settings)
        if self.elastic.levels is not None and self.elastic.widths != ElasticOptions().widths:
            logger.warning("elastic.levels %s chooses the levels; elastic.widths %s is not used",
                           self.elastic.levels, self.elastic.widths)
        budget = self.budget
        if budget.kind == "widths" and self.elastic.levels is not None:  # {widths: [...]} is plain widths
            self.elastic = dataclasses.replace(self.elastic, widths=list(budget.values), levels=None)
        # latency budgets: any level may be below the full network on this device
        below_full = len(budget.values) if budget.kind == "latency_ms" else sum(1 for w in budget.values if w < 1.0)
        o = self.options
        if o.final_grow_levels > 1 and o.grow_mode != "freeze":
            raise ValueError(f"final_grow_levels={o.final_grow_levels!r} needs grow_mode='freeze' (grow_mode="
                             f"{o.grow_mode!r} trains every level in the last grow step already); set it to 1")
        if o.final_grow_levels > len(budget.values) - 1:
            raise ValueError(f"final_grow_levels={o.final_grow_levels!r} must be at most {len(budget.values) - 1}, the "
                             f"number of levels above the core ({len(budget.values)} levels; the core never trains "
                             f"again after its pruning step)")
        if self.options.prune_steps < max(1, below_full):
            raise ValueError(f"prune_steps={self.options.prune_steps!r} must be an integer >= {max(1, below_full)} "
                             f"(one step per level below the full network)")

    @classmethod
    def num_levels(cls, options: PruneAndGrowOptions, elastic: ElasticOptions) -> Optional[int]:
        if elastic.levels is not None:
            return len(parse_levels(elastic.levels).values)
        return len(elastic.widths)

    @property
    def budget(self) -> Budgets:
        """What the levels must fit (uniform ``widths`` unless ``elastic.levels`` gives budgets)."""
        if self.elastic.levels is not None:
            return parse_levels(self.elastic.levels)
        return Budgets("widths", tuple(self.elastic.widths))

    @property
    def widths(self) -> list[float]:
        """Uniform level widths (budget levels have per-group widths: see ``report()``)."""
        return self.elastic.widths if self.elastic.levels is None else []

    @property
    def ignored_layers(self) -> list[str]:
        return self.elastic.ignored_layers

    @ignored_layers.setter
    def ignored_layers(self, value: Sequence[str]) -> None:
        self.elastic = dataclasses.replace(self.elastic, ignored_layers=list(value))

    @property
    def finetune_lr(self) -> float:
        return self.options.finetune_lr if self.options.finetune_lr is not None else self.train.lr / 5

    @property
    def grow_lr(self) -> float:
        return self.options.grow_lr if self.options.grow_lr is not None else self.train.lr / 2

    # ------------------------------------------------------------------ plan
    def prune_path(self) -> list[float]:
        """Target widths of the pruning steps, largest first (level widths plus intermediate ones).

        Budget levels: the MACs fractions of the steps (latency budgets: known after the wrap)."""
        if self.budget.kind == "latency_ms":
            return []
        return _insert_points(list(self.budget.values), self.options.prune_steps)

    def plan(self) -> list[Step]:
        """The named steps ``fit`` runs, in order."""
        if self.budget.kind == "widths":
            return self._width_plan()
        b = self.budget
        steps = [Step("pretrain", "pretrain")] if self.options.pretrain_epochs else []
        steps.append(Step("wrap", "wrap"))
        # targets (channels per group) are chosen at the wrap and kept in the checkpoint
        steps += [Step(f"prune_{j + 1}_of_{self.options.prune_steps}", "prune", j) for j in range(self.options.prune_steps)]
        steps += [Step(f"grow_{i}_{b.label(i)}", "grow", i) for i in range(1, len(b.values))]
        steps.append(Step("calibrate", "calibrate"))
        return steps

    def _width_plan(self) -> list[Step]:
        steps = []
        if self.options.pretrain_epochs:
            steps.append(Step("pretrain", "pretrain"))
        steps.append(Step("wrap", "wrap"))
        previous: Optional[float] = None  # None: the largest level
        for j, w in enumerate(self.prune_path()):
            steps.append(Step(f"prune_{j + 1}_w{w:.3f}", "prune", (w, previous)))
            previous = w
        for i in range(1, len(self.widths)):
            steps.append(Step(f"grow_{i}_w{self.widths[i]:.3f}", "grow", i))
        steps.append(Step("calibrate", "calibrate"))
        return steps

    # ------------------------------------------------------------------ fit
    def fit(
        self,
        model: nn.Module,
        train_data: Dataset | DataLoader,
        val_data: Dataset | DataLoader,
        *,
        resume: bool = False,
        example_inputs: Optional[torch.Tensor] = None,
    ) -> StrategyResult:
        """Run every step (skipping those a checkpoint records as done when ``resume``).

        Returns the :class:`StrategyResult`; ``result.elastic_model`` holds the levels, in eval mode.
        """
        device = resolve_device(self.device)
        example = example_inputs if example_inputs is not None else example_from(train_data)
        data = _Data(train_data, val_data, device)
        steps = self.plan()
        em: Optional[ElasticModel] = None
        self.completed_, self.records_ = [], {"compute_full_epochs": 0.0, "steps": {}}
        self.teacher_ = None
        # a teacher run per batch (see _Teacher) is rebuilt on resume from a plain copy of the model
        skeleton = copy.deepcopy(model) if resume and self.options.distill and isinstance(train_data, DataLoader) else None
        if resume:
            em = self._resume(model, device)
            self.elastic_model_ = em
            if self.options.distill and "wrap" in self.completed_:
                self.teacher_ = _Teacher.load(self._checkpoint_path("teacher.pt"), skeleton, device)
        model = model.to(device)
        for index, step in enumerate(steps):
            if step.name in self.completed_:
                continue
            seed_everything(self.train.seed + 1000 * index)
            if step.kind == "pretrain":
                info = self._pretrain(model, data, index)
            elif step.kind == "wrap":
                if self.options.distill:  # the trained full network, before any pruning
                    self.teacher_ = self._make_teacher(model, data)
                em = self._wrap(model, example, data)
                info = {}
                self.elastic_model_ = em
            elif step.kind == "prune" and isinstance(step.arg, int):  # budget levels: targets chosen at the wrap
                targets = self.records_["prune_targets"]
                info = self._prune(em, targets[step.arg], targets[step.arg - 1] if step.arg else None, data, index)
            elif step.kind == "prune":
                info = self._prune(em, *step.arg, data, index)
            elif step.kind == "grow":
                info = self._grow(em, step.arg, data, index)
            else:
                info = self._calibrate(em, data)
            self.records_["steps"][step.name] = info
            self.completed_.append(step.name)
            self._save(em, model, step)
            self._notify(StepInfo(step.name, index, len(steps), info.get("val_accuracy"), info))
        self.elastic_model_ = em
        self._build_report(em, data)
        if is_main():  # timed where the files are written; the other processes would only compete for cores
            b = self.budget
            if b.kind == "latency_ms":  # as the budgets were measured: next to them in the report
                self.measure_latency(batch_size=b.batch_size, form=b.form)
            else:
                self.measure_latency()
        # eval: ready to deploy (a train-mode forward would move a level's BatchNorm statistics)
        return self._result(em.eval())

    def _resume(self, model: nn.Module, device: torch.device) -> Optional[ElasticModel]:
        if self.checkpoint_dir is None:
            raise ValueError("resume=True needs checkpoint_dir=<the directory of the interrupted run>")
        path, pre = self._checkpoint_path(), self._checkpoint_path("pretrain.pt")
        if path.is_file():
            em = ElasticModel.load(path, model=model).to(device)
            self._check_config(em.metadata.get("config"), path)
            self._restore_state(em.metadata["strategy_state"])
            return em
        if pre.is_file():
            payload = read_checkpoint(pre, what="pretraining checkpoint")
            if not isinstance(payload, dict) or "state_dict" not in payload:
                raise CheckpointError(f"{pre} is not an nni-elastic pretraining checkpoint; remove it to start again")
            self._check_config(payload.get("config"), pre)
            model.load_state_dict(payload["state_dict"])
            self._restore_state(payload["strategy_state"])
        return None

    def _save(self, em: Optional[ElasticModel], model: nn.Module, step: Step) -> None:
        if self.checkpoint_dir is None:
            return
        if em is None:
            state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
            atomic_save({"state_dict": state, "strategy_state": self._state(), "config": self.config()},
                        self._checkpoint_path("pretrain.pt"))
        else:
            em.save(self._checkpoint_path(), strategy_state=self._state(), config=self.config())

    def config(self) -> dict[str, Any]:
        """The strategy's settings as plain data (stored in checkpoints)."""
        o, t, e = self.options, self.train, self.elastic
        out = {"widths": e.widths, "levels": e.levels, "prune_steps": o.prune_steps, "pretrain_epochs": o.pretrain_epochs,
               "finetune_epochs": o.finetune_epochs, "core_epochs": o.core_epochs, "grow_epochs": o.grow_epochs,
               "final_grow_epochs": o.final_grow_epochs,
               "final_grow_levels": o.final_grow_levels, "path_samples": o.path_samples, "grow_mode": o.grow_mode,
               "regrow": o.regrow, "distill": o.distill or None,
               "distill_temperature": o.distill_temperature if o.distill else None, "lr": t.lr,
               "finetune_lr": self.finetune_lr, "grow_lr": self.grow_lr,
               "batch_size": t.batch_size, "optimizer": t.optimizer, "momentum": t.momentum,
               "weight_decay": t.weight_decay, "bn": e.bn, "round_to": e.round_to,
               "calibrate_batches": o.calibrate_batches, "seed": t.seed}
        out["importance"] = e.importance if isinstance(e.importance, str) else "callable"
        return out

    # ------------------------------------------------------------------ steps
    def _cfg(self, epochs: int, lr: float, index: int) -> TrainConfig:
        """The training settings of step ``index``: its epochs and rate, a seed of its own."""
        return dataclasses.replace(self.train, epochs=epochs, lr=lr, seed=self.train.seed + 1000 * index)

    def _importance_data(self, data: _Data) -> Optional[list]:
        if self.elastic.importance in GRADIENT_IMPORTANCES:
            return first_batches(data.train, self.train.batch_size, 4)
        return None

    def _pretrain(self, model: nn.Module, data: _Data, index: int) -> dict[str, Any]:
        epochs = self.options.pretrain_epochs
        hist = train(model, data.train, data.val, self._cfg(epochs, self.train.lr, index),
                     device=data.device, quiet=self.quiet, desc="pretrain")
        self.records_["pretrain_epochs_done"] = epochs
        return {"val_accuracy": hist.last.get("val_accuracy"), "full_epochs": float(epochs)}

    def _wrap(self, model: nn.Module, example: torch.Tensor, data: _Data) -> ElasticModel:
        e = self.elastic
        example = example.to(data.device)
        levels = None
        if self.budget.kind != "widths":
            levels = self._plan_levels(model, example, data)
        em = ElasticModel(model, example, e.widths, levels=levels, importance=e.importance, ignored_layers=e.ignored_layers,
                          bn=e.bn, round_to=e.round_to, unsupported=e.unsupported, data=self._importance_data(data))
        em = em.to(data.device)
        # pretraining ran at full width before wrapping: its compute counts in full-model epochs
        self.records_["compute_full_epochs"] += float(self.records_.get("pretrain_epochs_done", 0))
        return em

    def _plan_levels(self, model: nn.Module, example: torch.Tensor, data: _Data) -> list[dict[str, int]]:
        """Budget levels: per-group channels of every level and prune step (:func:`nni_elastic.budget.allocate`)."""
        e = self.elastic
        plan = allocate(model, example, self.budget, importance=e.importance, data=self._importance_data(data),
                        ignored_layers=e.ignored_layers, round_to=e.round_to, unsupported=e.unsupported,
                        extra_fractions=self.prune_path(), calibration=first_batches(data.train, 256, 2))
        fractions = [plan.estimated_fraction(lv) for lv in plan.levels]
        points = _insert_points(fractions, self.options.prune_steps)
        targets = [plan.levels[fractions.index(p)] if p in fractions else plan.at_fraction(p) for p in points]
        # several processes: rank 0's plan everywhere (latency budgets are timed, so ranks could differ)
        levels, targets, budget = from_main((plan.levels, targets, plan.to_dict()))
        self.records_["prune_targets"], self.records_["budget"] = targets, budget
        logger.info("levels for %s: MACs %s of the full network", self.budget.to_dict(),
                    ", ".join(f"{100 * r:.1f}%" for r in budget["macs_ratio"]))
        return levels

    def _level_of(self, em: ElasticModel, width: Union[float, dict]) -> Union[int, float, dict]:
        for lv in em.levels_:
            if isinstance(width, dict) and lv.channels == width:
                return lv.index
            if not isinstance(width, dict) and lv.width is not None and abs(lv.width - width) < 1e-9:
                return lv.index
        return width

    def _macs_ratio(self, em: ElasticModel, level: Union[int, float]) -> float:
        full = em.levels[-1].macs
        if isinstance(level, int):
            return em.levels[level].macs / full
        return em.count(level)[0] / full

    def _prune(self, em: ElasticModel, width: float, previous: Optional[float], data: _Data, index: int) -> dict[str, Any]:
        # the channels kept by the previous step (a pure function of the plan, so resume agrees)
        prefix = em.channels_of(-1 if previous is None else self._level_of(em, previous))
        em.reorder(self.elastic.importance, data=self._importance_data(data), prefix=prefix)  # re-score the channels still kept
        target = self._level_of(em, width)
        em.set_level(target)
        guard = ParameterGuard(em.model, em.parameter_masks(target))
        epochs = self._finetune_epochs(target)
        train_data, step = self._single_level(data, epochs)
        hist = train(em, train_data, data.val, self._cfg(epochs, self.finetune_lr, index),
                     step=step, params=guard.params, after_step=guard, device=data.device, quiet=self.quiet, desc=f"prune to {self._macs_ratio(em, target):.1%} MACs" if isinstance(width, dict) else f"prune to {width:.2f}")
        ratio = self._macs_ratio(em, target)
        self.records_["compute_full_epochs"] += epochs * ratio
        label = {"level": target} if isinstance(width, dict) and isinstance(target, int) else {}
        return {"width": None if isinstance(width, dict) else width, **label,
                "val_accuracy": hist.last.get("val_accuracy"), "macs_ratio": ratio}

    def _finetune_epochs(self, target: Union[int, float, dict]) -> int:
        """Epochs of the pruning step to ``target``: ``core_epochs`` for the core (level 0), else ``finetune_epochs``."""
        o = self.options
        core = isinstance(target, int) and not isinstance(target, bool) and target == 0
        return o.core_epochs if core and o.core_epochs is not None else o.finetune_epochs

    def _grow(self, em: ElasticModel, level: int, data: _Data, index: int) -> dict[str, Any]:
        em.set_level(level)
        new = em.parameter_masks(level)
        old = em.parameter_masks(level - 1)
        fresh = {k: new[k] & ~old[k] for k in new}
        if self.options.regrow == "reinit":
            _reinit(em.model, fresh)
        epochs = self._grow_epochs(level, em.num_levels)
        train_data = data.train
        if self.options.grow_mode == "freeze" and level == em.num_levels - 1 and self.options.final_grow_levels > 1:
            levels = self._final_levels(em.num_levels)
            below = em.parameter_masks(levels[0] - 1)
            trainable = {k: new[k] & ~below[k] for k in new}
            step = lambda m, x, y: elastic_step(m, x, y, levels=levels)  # noqa: E731
        elif self.options.grow_mode == "freeze":
            trainable, levels = fresh, [level]
            train_data, step = self._single_level(data, epochs)
        else:
            trainable, levels = new, list(range(level + 1))
            points = _PathPoints([em.channels_of(i) for i in levels], self.options.path_samples,
                                 self.train.seed + 1000 * index)
            step = lambda m, x, y: elastic_step(m, x, y, levels=levels, extra=points())  # noqa: E731
        guard = ParameterGuard(em.model, trainable)
        hist = train(em, train_data, data.val, self._cfg(epochs, self.grow_lr, index),
                     step=step, params=guard.params, after_step=guard, device=data.device, quiet=self.quiet,
                     desc=f"grow level {level}")
        ratios = [self._macs_ratio(em, i) for i in levels]
        path = 0.0
        if self.options.grow_mode == "joint" and self.options.path_samples:
            # a point's MACs are at most linear in its interpolation fraction (convex in the channels):
            # a gap's mean point costs at most the mean of its two ends
            gaps = [(lo + hi) / 2 for lo, hi in zip(ratios, ratios[1:])]
            path = self.options.path_samples * sum(gaps) / len(gaps)
        self.records_["compute_full_epochs"] += epochs * (sum(ratios) + path)
        return {"level": level, "val_accuracy": hist.last.get("val_accuracy")}

    def _make_teacher(self, model: nn.Module, data: _Data) -> "_Teacher":
        """Distillation targets from the trained full network: its logits per training sample, computed once.

        The one forward pass over the training set counts :data:`FORWARD_COST` full epochs. A
        ``DataLoader`` (no sample indices) or logits too large to hold (over 2 GiB) fall back to a
        frozen copy of the network run on every distilled batch; each distilled epoch then costs
        ``FORWARD_COST`` more full epochs.
        """
        teacher, reason = None, "the training data is a DataLoader, which gives no sample indices"
        if not isinstance(data.train, DataLoader):
            rows = num_samples(data.train)
            classes = predictions(model, Subset(data.train, range(min(1, rows))), device=data.device).shape[-1]
            if rows * classes * 4 <= 2 ** 31:
                logits = predictions(model, data.train, batch_size=max(256, self.train.batch_size), device=data.device)
                self.records_["compute_full_epochs"] += FORWARD_COST
                teacher = _Teacher(targets=logits.to(data.device))
            else:
                reason = f"its logits ({rows} samples x {classes} classes) would take over 2 GiB"
        if teacher is None:
            logger.warning("distill: %s; the trained network runs as teacher on every distilled batch instead "
                           "(each distilled epoch costs %.2f full epochs more)", reason, FORWARD_COST)
            teacher = _Teacher(model=_frozen_copy(model))
        if self.checkpoint_dir is not None and is_main():
            teacher.save(self._checkpoint_path("teacher.pt"))
        return teacher

    def _single_level(self, data: _Data, epochs: int) -> tuple[Any, Any]:
        """The training data and step of a one-level phase (pruning fine-tune, freeze-mode grow)."""
        teacher = self.teacher_
        if teacher is None:
            return data.train, plain_step
        o = self.options
        self.records_["compute_full_epochs"] += epochs * teacher.cost_per_epoch
        return teacher.data(data.train), teacher.step(o.distill, o.distill_temperature)

    def _grow_epochs(self, level: int, num_levels: int) -> int:
        final = self.options.final_grow_epochs
        return final if final is not None and level == num_levels - 1 else self.options.grow_epochs

    def _final_levels(self, num_levels: int) -> list[int]:
        """The levels the last grow step trains in freeze mode (``final_grow_levels`` largest, never the core)."""
        return list(range(max(1, num_levels - self.options.final_grow_levels), num_levels))

    def _calibrate(self, em: ElasticModel, data: _Data) -> dict[str, Any]:
        levels = self._stale_levels(em)
        if self.options.calibrate_batches and levels:
            batches = first_batches(data.train, self.train.batch_size, self.options.calibrate_batches)
            for i in levels:
                em.calibrate_bn(batches, level=i)
        em.set_level(-1)
        acc = evaluate_levels(em, data.val, device=data.device)
        self.records_["level_accuracy"] = [r["accuracy"] for r in acc]
        calibrated = levels if self.options.calibrate_batches else []
        return {"val_accuracy": acc[-1]["accuracy"], "level_accuracy": self.records_["level_accuracy"],
                "calibrated_levels": calibrated}

    def _stale_levels(self, em: ElasticModel) -> list[int]:
        """The levels whose BatchNorm statistics the final calibration recomputes.

        ``grow_mode="joint"`` (or ``bn="shared"``): every level, since training a level moves weights
        (or the one set of statistics) that the others read. ``grow_mode="freeze"`` with per-level
        statistics: a level's statistics row is final once the level has trained on its own at its
        final weights, the core in the last pruning step (``core_epochs`` or ``finetune_epochs`` > 0) and each grown
        level in its grow step (``grow_epochs``, or ``final_grow_epochs`` for the last, > 0);
        afterwards its weights are frozen and only the growing level runs train-mode forwards, which update only its own row. Recalibrating such
        a level would change its outputs after its build step, which freeze mode promises not to
        do, so only levels that never trained on their own (zero epochs) are calibrated.
        """
        every = list(range(em.num_levels))
        if self.options.grow_mode != "freeze" or em.bn_mode != "per_level":
            return every
        # the last pruning step trains the core alone, unless the core is the full network
        full = {g.name: g.size for g in em.graph.groups}
        core_trained = self._finetune_epochs(0) > 0 and em.levels_[0].channels != full
        stale = [] if core_trained else [0]
        final = self._final_levels(em.num_levels) if self._grow_epochs(em.num_levels - 1, em.num_levels) else []
        return stale + [i for i in every[1:] if self._grow_epochs(i, em.num_levels) == 0 and i not in final]

    def _build_report(self, em: ElasticModel, data: _Data) -> None:
        accuracy = (self.records_.get("level_accuracy")
                    or [r["accuracy"] for r in evaluate_levels(em, data.val, device=data.device)])
        rows = em.describe()
        for row, acc in zip(rows, accuracy):
            row["accuracy"] = acc
        b = self.budget
        if b.kind != "widths":  # each level next to what it had to fit
            for row, value in zip(rows, b.values):
                row["budget"] = f"{100 * value:.1f}% MACs" if b.kind == "macs" else f"{value:g} ms"
        self.report_ = rows
        full = em.levels[-1].macs
        self.compute_ = {
            "full_epochs": self.records_["compute_full_epochs"],
            "mac_samples": self.records_["compute_full_epochs"] * full * num_samples(data.train),
        }

    def measure_latency(self, batch_size: Optional[int] = None, form: str = "deploy") -> list[dict[str, Any]]:
        """Add measured latency (ms, current device) to the report rows.

        By default each level is timed as it would be deployed (``export(deploy=True)``) at the
        training batch size: at batch 1 on small inputs every level costs the same per-layer
        overhead and the levels do not separate.
        """
        em = self.elastic_model_
        batch_size = int(batch_size or self.train.batch_size)
        em.measure_levels(batch_size=batch_size, form=form)
        for row, lv in zip(self.report_, em.levels):
            row["latency_ms"] = lv.latency_ms
        self.records_["latency"] = {
            "form": form, "batch_size": batch_size, "device": str(em._device()),
            "input": "x".join(str(d) for d in em.example_shape[1:]),
        }
        return self.report()

    def _result(self, em: ElasticModel) -> StrategyResult:
        rows = self.report()
        return StrategyResult(elastic_model=em, rows=rows, compute=dict(self.compute_), records=self.records_,
                              model=em.model, metadata={"accuracy": [r["accuracy"] for r in rows], "report": rows})


def _insert_points(values: Sequence[float], steps: int) -> list[float]:
    """The levels below 1.0 plus ``steps - len(levels)`` points splitting the largest gaps, largest first."""
    levels = sorted((v for v in values if v < 1.0), reverse=True)
    points = [1.0] + levels
    inserted: list[float] = []
    for _ in range(steps - len(levels)):  # split the gap with the largest ratio at its geometric mean
        all_points = sorted(set(points + inserted), reverse=True)
        gaps = [(hi / lo, hi, lo) for hi, lo in zip(all_points, all_points[1:])]
        _, hi, lo = max(gaps)
        inserted.append(math.sqrt(hi * lo))
    return sorted(set(levels + inserted), reverse=True)


class _PathPoints:
    """Random configurations on the path between consecutive levels (``path_samples``), reproducible by seed.

    A point picks a gap between two consecutive levels uniformly and one fraction ``t`` in [0, 1):
    every group keeps ``lo + t * (hi - lo)`` channels (rounded), so points are nested between the
    two levels as :meth:`ElasticModel.add_level` points between them are.
    """

    def __init__(self, channels: Sequence[dict[str, int]], count: int, seed: int) -> None:
        self.channels, self.count = list(channels), count
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self) -> list[dict[str, int]]:
        out = []
        for _ in range(self.count if len(self.channels) > 1 else 0):
            i = int(torch.randint(len(self.channels) - 1, (1,), generator=self.generator))
            t = float(torch.rand((), generator=self.generator))
            lo, hi = self.channels[i], self.channels[i + 1]
            out.append({g: int(round(lo[g] + (hi[g] - lo[g]) * t)) for g in lo})
        return out


@dataclass
class _Data:
    """What every step of one ``fit`` reads: the data and the device."""

    train: Any
    val: Any
    device: torch.device


def _frozen_copy(model: nn.Module) -> nn.Module:
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


class _Teacher:
    """Where the distillation targets come from: logits per training sample, or a frozen model run per batch."""

    def __init__(self, *, targets: Optional[torch.Tensor] = None, model: Optional[nn.Module] = None) -> None:
        self.targets, self.model = targets, model

    @property
    def cost_per_epoch(self) -> float:
        """Full-network epochs a distilled epoch adds (the teacher's forward passes)."""
        return 0.0 if self.targets is not None else FORWARD_COST

    def data(self, train: Any) -> Any:
        return IndexedDataset(train) if self.targets is not None else train

    def step(self, weight: float, temperature: float) -> Any:
        return distill_step(weight, temperature, targets=self.targets, teacher=self.model)

    def save(self, path: Any) -> None:
        if self.targets is not None:
            payload = {"targets": self.targets.detach().cpu()}
        else:
            payload = {"state_dict": {k: v.detach().cpu() for k, v in self.model.state_dict().items()}}
        atomic_save(payload, path)

    @classmethod
    def load(cls, path: Any, skeleton: Optional[nn.Module], device: torch.device) -> "_Teacher":
        if not Path(path).is_file():
            raise CheckpointError(f"resume: {path} (the distillation teacher) is missing; the run's pruning has "
                                  f"started, so the trained network cannot be recovered: start a new run")
        payload = read_checkpoint(path, what="distillation teacher")
        if isinstance(payload, dict) and isinstance(payload.get("targets"), torch.Tensor):
            return cls(targets=payload["targets"].to(device))
        if isinstance(payload, dict) and isinstance(payload.get("state_dict"), dict) and skeleton is not None:
            skeleton.load_state_dict(payload["state_dict"])
            return cls(model=_frozen_copy(skeleton.to(device)))
        raise CheckpointError(f"resume: {path} is not this run's distillation teacher; remove the checkpoint "
                              f"directory's files to start again")


@torch.no_grad()
def _reinit(model: nn.Module, fresh: dict[str, torch.Tensor]) -> None:
    """Re-initialise the re-enabled entries (Kaiming for conv/linear weights, BN identity, zero bias)."""
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            mask = fresh.get(f"{mod_name}.{p_name}" if mod_name else p_name)
            if mask is None or not mask.any():
                continue
            new = torch.empty_like(p)
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                new.fill_(1.0 if p_name == "weight" else 0.0)
            elif p_name == "weight" and p.dim() > 1:
                nn.init.kaiming_normal_(new, mode="fan_out", nonlinearity="relu")
            else:
                new.zero_()
            p.copy_(torch.where(mask, new, p))
