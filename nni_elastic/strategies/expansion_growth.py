"""Expansion-score growth (SECNN, arXiv 2401.05686, after SENN, arXiv 2307.04526).

Start small and grow during training, never restarting it. Every ``check_every`` optimizer steps
the natural expansion score eta (see :mod:`nni_elastic.expansion.score`) of the current model is
compared with that of every candidate expansion, each function-preserving:

* a new identity-initialised block in a stage of a ``growable_cnn`` (SECNN's depth growth);
* ``width_fraction`` more channels in any channel group of the dependency graph (SENN's width
  growth, here on any traceable CNN: ResNets grow in width too).

A candidate is scored on its expanded parameters with the same fixed, absolute damping lambda
as the current model, and its gain is the increase of the score,
``eta_candidate - eta_current - size_penalty * added / params`` (SENN's Delta eta, with a cost
for the added parameters as in SECNN's score-plus-regularisation criterion). The best candidate is
applied when its gain exceeds ``threshold`` and the model stays within ``max_params`` /
``max_macs``. Each expansion closes a complexity level: the model just before it is evaluated
and checkpointed, so one run yields checkpoints at several sizes.

Why the absolute increase at a fixed lambda, not a ratio (PAPERS.md, "a pitfall"): eta is the
first-order loss decrease of one damped natural-gradient step, so with lambda fixed for the run
(``damping``) Delta eta is the extra decrease the new parameters would buy, about
``|g_new|^2 / lambda``; it shrinks as a model fits its data. We measured on digits
(growable_cnn trained 10 epochs, N=128, lambda=1): best Delta eta = 0.049, 0.033, 0.015, 0.010
for channels (2,4,4), (4,8,8), (16,32,32), (32,64,64), while the ratio eta_c / eta - 1 grows
with size (0.175, 0.172, 0.297, 0.301) and a lambda relative to the current trace(F) saturates eta
near 1 for small models. So the threshold on Delta eta makes growth selective: a network that is
already big enough does not grow (tests check both directions). Checks start after
``warmup_steps`` so that the large gradients of the first steps do not trigger growth.

Deviations: SENN scores new neurons with a K-FAC Fisher and chooses their initialisation to
maximise the score; we compute the exact empirical-Fisher score of whole candidate models (Woodbury,
O(N^3)) with random new incoming weights. The optimizer state of old parameters is carried over;
new entries start with zero momentum.

Example:
    >>> eg = ExpansionGrowth(threshold=0.03, check_every=50, max_params=200_000, damping=1.0)
    >>> result = eg.fit(create_model("growable_cnn", in_channels=1, channels=(8, 16, 32)), train, val)
    >>> [(c.params, c.accuracy) for c in result.checkpoints]
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch_pruning as tp
from torch.utils.data import DataLoader, Dataset

from ..checkpoint import atomic_save, growth_payload, read_growth
from ..device import resolve_device
from ..expansion.ops import add_block, update_optimizer, widen_group
from ..expansion.score import FisherGram, _check_inputs, per_sample_gradients
from ..graph import build_channel_graph
from ..training import evaluate, make_optimizer, make_scheduler, seed_everything, train
from ._base import StepInfo, Strategy, example_from, num_samples, train_config

__all__ = ["ExpansionGrowth", "GrowthCheckpoint", "GrowthResult", "load_growth_checkpoint", "CANDIDATE_KINDS"]

logger = logging.getLogger(__name__)

CANDIDATE_KINDS = ("depth", "width")


@dataclass
class GrowthCheckpoint:
    """One complexity level reached during growth."""

    level: int
    params: int
    macs: int
    accuracy: float
    step: int
    epoch: int
    path: Optional[str]
    expansion: Optional[str] = None  # the expansion that ended this level (None for the final model)


@dataclass
class GrowthResult:
    """What :meth:`ExpansionGrowth.fit` returns."""

    model: nn.Module
    checkpoints: list[GrowthCheckpoint]
    expansions: list[dict[str, Any]]
    history: list[dict[str, Any]]
    widths_only: bool = field(default=True)

    def elastic_model(self, example_inputs: torch.Tensor, calibration: Optional[Any] = None):
        """The growth stages as nested levels of one ElasticModel (width-only growth).

        New channels are appended after the old ones, so each earlier stage's channel counts are a
        prefix of the final model's. The levels slice the *final* weights (old channels have kept
        training after later growth), so their accuracy differs from the checkpoints': pass
        ``calibration`` batches to recompute BatchNorm statistics, and evaluate them. Depth growth
        (added blocks) cannot be expressed as levels: an ElasticModel has no skippable layers yet.
        """
        from ..elastic import ElasticModel

        if not self.widths_only:
            raise ValueError("growth added blocks (depth); only width-only growth maps onto ElasticModel levels")
        stages = [e["channels_before"] for e in self.expansions] + [self.expansions[-1]["channels_after"]] if self.expansions else []
        model = copy.deepcopy(self.model)
        graph = build_channel_graph(model, example_inputs)
        sizes = {g.name: g.size for g in graph.groups}
        levels = [{g: min(c.get(g, sizes[g]), sizes[g]) for g in sizes} for c in stages] or [sizes]
        unique = [lv for i, lv in enumerate(levels) if i == 0 or lv != levels[i - 1]]
        em = ElasticModel(model, example_inputs, levels=unique, reorder=False)
        if calibration is not None:
            for i in range(em.num_levels):
                em.calibrate_bn(calibration, level=i)
        return em


def load_growth_checkpoint(path: Union[str, Path], *, model: Optional[nn.Module] = None,
                           trust: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """Load a growth checkpoint: ``(model, metadata)``, read with ``weights_only=True``.

    Args:
        path: a ``level{i}.pt`` written by :class:`ExpansionGrowth`.
        model: for models outside the zoo, a new instance of the architecture growth started
            from (its channels are resized to the stored ones).
        trust: unpickle a model stored by nni-elastic before 0.2 (runs code from the file).
    """
    module, payload = read_growth(path, model=model, trust=trust)
    return module, payload["metadata"]


def _expanded_gram(trial: nn.Module, changes: list, current: FisherGram, x: torch.Tensor, y: torch.Tensor) -> FisherGram:
    """The Gram matrix of an expanded model from the current one plus the new entries' gradients."""
    names = {id(p): n for n, p in trial.named_parameters()}
    grown = [c for c in changes if id(c.new) in names]
    masks = []
    for c in grown:
        mask = torch.ones_like(c.new, dtype=torch.bool) if c.old is None else torch.zeros_like(c.new, dtype=torch.bool)
        if c.old is not None:
            mask.narrow(c.dim, c.index, c.count).fill_(True)
        masks.append(mask.flatten())
    g = per_sample_gradients(trial, x, y, params=[names[id(c.new)] for c in grown])
    g_new = g[:, torch.cat(masks)].double()
    return FisherGram(current.gram + g_new @ g_new.T, current.num_params + int(g_new.shape[1]))


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class ExpansionGrowth(Strategy):
    """Grow a small CNN during training where the natural expansion score says capacity helps.

    Args:
        threshold: minimum increase of eta (after the size penalty) to expand (>= 0).
        check_every: optimizer steps between growth checks.
        warmup_steps: optimizer steps before the first check (default: ``2 * check_every``).
        max_params, max_macs: budget; candidates that would exceed it are not taken.
        damping: the absolute Fisher damping lambda, fixed for the whole run.
        size_penalty: cost per relative parameter increase subtracted from the gain.
        score_batch: samples N of the score (the Gram matrix is N x N).
        candidates: expansion kinds, ``"depth"`` (growable_cnn blocks) and/or ``"width"``.
        width_fraction: channels added to a group, as a fraction of its size (at least 1).
        epochs, lr, batch_size, optimizer, momentum, weight_decay: training settings.
        seed, device, quiet, checkpoint_dir, on_step_end: as for every strategy
            (``on_step_end`` is called after each epoch).
    """

    name = "expansion_growth"

    def __init__(
        self,
        threshold: float = 0.03,
        *,
        check_every: int = 100,
        warmup_steps: Optional[int] = None,
        max_params: Optional[int] = None,
        max_macs: Optional[int] = None,
        damping: float = 1.0,
        size_penalty: float = 0.0,
        score_batch: int = 64,
        candidates: Sequence[str] = CANDIDATE_KINDS,
        width_fraction: float = 0.25,
        epochs: int = 10,
        lr: float = 0.05,
        batch_size: int = 64,
        optimizer: str = "sgd",
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        seed: int = 0,
        device: str = "auto",
        quiet: bool = False,
        checkpoint_dir: Optional[Union[str, Path]] = None,
        on_step_end: Optional[Callable[[StepInfo], Any]] = None,
    ) -> None:
        super().__init__(checkpoint_dir=checkpoint_dir, quiet=quiet, on_step_end=on_step_end)
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or threshold < 0:
            raise ValueError(f"threshold={threshold!r} must be >= 0 (the increase of the expansion score needed to expand)")
        if not isinstance(check_every, int) or check_every < 1:
            raise ValueError(f"check_every={check_every!r} must be an integer >= 1")
        if not isinstance(damping, (int, float)) or isinstance(damping, bool) or not damping > 0:
            raise ValueError(f"damping={damping!r} must be > 0")
        if size_penalty < 0:
            raise ValueError(f"size_penalty={size_penalty!r} must be >= 0")
        if not isinstance(score_batch, int) or score_batch < 2:
            raise ValueError(f"score_batch={score_batch!r} must be an integer >= 2")
        unknown = [c for c in candidates if c not in CANDIDATE_KINDS]
        if unknown or not candidates:
            raise ValueError(f"candidates={list(candidates)!r}: use a non-empty subset of {CANDIDATE_KINDS}")
        if not 0 < width_fraction <= 4:
            raise ValueError(f"width_fraction={width_fraction!r} must be in (0, 4]")
        for key, value in (("max_params", max_params), ("max_macs", max_macs)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{key}={value!r} must be a positive integer or None")
        if warmup_steps is not None and (not isinstance(warmup_steps, int) or warmup_steps < 0):
            raise ValueError(f"warmup_steps={warmup_steps!r} must be an integer >= 0")
        self.threshold, self.check_every, self.damping, self.size_penalty = float(threshold), check_every, float(damping), float(size_penalty)
        self.warmup_steps = 2 * check_every if warmup_steps is None else warmup_steps
        self.max_params, self.max_macs, self.score_batch = max_params, max_macs, score_batch
        self.candidates, self.width_fraction = tuple(candidates), float(width_fraction)
        self.cfg = train_config(epochs, lr, batch_size, optimizer, momentum, weight_decay, seed)
        self.seed, self.device = seed, device

    def config(self) -> dict[str, Any]:
        """The settings that determine a run, as plain data (stored in the resume state)."""
        return {"threshold": self.threshold, "check_every": self.check_every, "warmup_steps": self.warmup_steps,
                "max_params": self.max_params, "max_macs": self.max_macs, "damping": self.damping,
                "size_penalty": self.size_penalty, "score_batch": self.score_batch, "candidates": list(self.candidates),
                "width_fraction": self.width_fraction, "seed": self.seed,
                **{k: getattr(self.cfg, k) for k in ("epochs", "lr", "batch_size", "optimizer", "momentum", "weight_decay")}}

    # ------------------------------------------------------------------ scoring
    def _score_batch(self, data: Any) -> tuple[torch.Tensor, torch.Tensor]:
        loader = DataLoader(data.dataset if isinstance(data, DataLoader) else data, batch_size=self.score_batch,
                            shuffle=True, generator=torch.Generator().manual_seed(self.seed + 7919 * (len(self.expansions_) + 1) + self._checks))
        x, y = next(iter(loader))
        return x.to(self._device), y.to(self._device)

    def _candidates(self, model: nn.Module) -> list[tuple[str, Callable[[nn.Module], list]]]:
        out: list[tuple[str, Callable[[nn.Module], list]]] = []
        if "depth" in self.candidates and hasattr(model, "add_block"):
            for s in range(len(model.stages)):
                calibration = getattr(self, "_calibration", None)
                out.append((f"depth:stage{s}", lambda m, s=s, c=calibration: add_block(m, s, calibration=c)))
        if "width" in self.candidates:
            graph = build_channel_graph(model, self._example)
            for g in graph.groups:
                k = max(1, math.ceil(self.width_fraction * g.size))

                def grow(m: nn.Module, name: str = g.name, k: int = k) -> list:
                    return widen_group(m, build_channel_graph(m, self._example).group(name), k)

                out.append((f"width:{g.name}+{k}", grow))
        return out

    def check(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
        """Score the current model and every candidate on one batch; return the decision record.

        Every expansion preserves the function, so the per-sample gradients of the old parameters
        are the same in the expanded model: its Gram matrix is the current one plus the Gram of the
        new entries only, K_c = K + G_new G_new^T. Only the grown tensors are differentiated.
        """
        _check_inputs(x, y, self.damping, "absolute")
        self._calibration = x  # new blocks take their BatchNorm statistics from the score batch
        lam = self.damping
        current = FisherGram.of(model, x, y)
        eta = current.score(lam)
        params, best = _num_params(model), None
        scores = {}
        self._candidate_ops = dict(self._candidates(model))  # the chosen one is applied as scored
        for name, apply in self._candidate_ops.items():
            trial = copy.deepcopy(model)
            rng = torch.get_rng_state()
            changes = apply(trial)
            torch.set_rng_state(rng)
            added = _num_params(trial) - params
            if self.max_params is not None and params + added > self.max_params:
                continue
            if self.max_macs is not None and self._macs(trial) > self.max_macs:
                continue
            eta_c = _expanded_gram(trial, changes, current, x, y).score(lam)
            gain = eta_c - eta - self.size_penalty * added / params
            scores[name] = {"eta": eta_c, "gain": gain, "ratio": eta_c / max(eta, 1e-12), "added_params": added}
            if best is None or gain > scores[best]["gain"]:
                best = name
        take = best is not None and scores[best]["gain"] > self.threshold
        return {"eta": eta, "lambda": lam, "candidates": scores, "best": best, "expand": take}

    def _macs(self, model: nn.Module) -> int:
        return int(tp.utils.count_ops_and_params(model, self._example)[0])  # counts on a copy in eval mode

    # ------------------------------------------------------------------ fit
    def fit(self, model: nn.Module, train_data: Dataset | DataLoader, val_data: Dataset | DataLoader, *,
            resume: bool = False, example_inputs: Optional[torch.Tensor] = None) -> GrowthResult:
        """Train with growth checks; return the final model and one checkpoint per complexity level."""
        device = resolve_device(self.device)
        self._device, self._val = device, val_data
        self._example = (example_inputs if example_inputs is not None else example_from(train_data)).to(device)
        self.expansions_, self.checkpoints_, self.history_, self._checks = [], [], [], 0
        self.checks_: list[dict[str, Any]] = []
        model = model.to(device)
        steps_per_epoch = math.ceil(num_samples(train_data) / self.cfg.batch_size)
        self._train_data_for_scores, self._steps_per_epoch = train_data, steps_per_epoch
        start_epoch, state = 0, None
        if resume:
            model, state = self._load_state(model, device)
            start_epoch = state["epoch"] if state else 0
        self._model = model
        opt = make_optimizer([p for p in model.parameters() if p.requires_grad], self.cfg)
        sched = make_scheduler(opt, self.cfg, steps_per_epoch)
        if state is not None:
            self._restore_optimizer(model, opt, sched, state)
        seed_everything(self.seed + start_epoch)

        total_steps = self.cfg.epochs * steps_per_epoch

        def after_step(optimizer: torch.optim.Optimizer, step: int) -> None:
            due = step >= self.warmup_steps and step % self.check_every == 0 and step < total_steps
            if due and not self._budget_reached():
                self._grow(optimizer, step)

        def on_epoch_end(epoch: int, record: dict) -> None:
            self.history_.append(dict(record))
            self._save_state(opt, sched, epoch + 1)
            self._notify(StepInfo(f"epoch_{epoch + 1}", epoch, self.cfg.epochs, record.get("val_accuracy"),
                                  {"params": _num_params(self._model), "expansions": len(self.expansions_)}))

        train(model, train_data, val_data, self.cfg, device=device, quiet=self.quiet, desc="grow",
              after_step=after_step, on_epoch_end=on_epoch_end, optimizer=opt, scheduler=sched, start_epoch=start_epoch)
        final_step = self.cfg.epochs * steps_per_epoch
        if not self.checkpoints_ or self.checkpoints_[-1].expansion is not None:  # the final level
            self._checkpoint(final_step, self.cfg.epochs, None)
        self.report_ = [asdict(c) for c in self.checkpoints_]
        widths_only = all(e["kind"] == "width" for e in self.expansions_)
        return GrowthResult(self._model.eval(), list(self.checkpoints_), list(self.expansions_), list(self.history_), widths_only)

    def _budget_reached(self) -> bool:
        return self.max_params is not None and _num_params(self._model) >= self.max_params

    def _grow(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        model = self._model
        x, y = self._score_batch(self._train_data_for_scores)
        self._checks += 1
        decision = self.check(model, x, y)
        best = decision["best"]
        self.checks_.append({"step": step, "eta": decision["eta"], "best": best,
                             "gain": decision["candidates"][best]["gain"] if best else None, "expanded": decision["expand"]})
        logger.info("growth check at step %d: eta=%.4f best=%s", step, decision["eta"], decision["best"])
        if not decision["expand"]:
            return
        name = decision["best"]
        graph_before = {g.name: g.size for g in build_channel_graph(model, self._example).groups}
        self._checkpoint(step, step // max(1, self._steps_per_epoch), name)
        apply = self._candidate_ops[name]
        was_training = model.training
        changes = apply(model)
        model.train(was_training)
        update_optimizer(optimizer, changes)
        graph_after = {g.name: g.size for g in build_channel_graph(model, self._example).groups}
        self.expansions_.append({"step": step, "name": name, "kind": name.split(":")[0], "eta": decision["eta"],
                                 "gain": decision["candidates"][name]["gain"], "params": _num_params(model),
                                 "channels_before": graph_before, "channels_after": graph_after})

    def _checkpoint(self, step: int, epoch: int, expansion: Optional[str]) -> None:
        model = self._model
        acc = evaluate(model, self._val, device=self._device)["accuracy"]
        level = len(self.checkpoints_)
        path = None
        meta = {"level": level, "params": _num_params(model), "macs": self._macs(model), "accuracy": acc,
                "step": step, "epoch": epoch, "expansion": expansion}
        if self.checkpoint_dir is not None:
            path = self.checkpoint_dir / f"level{level}.pt"
            atomic_save(growth_payload(model, meta), path)
            path = str(path)
        self.checkpoints_.append(GrowthCheckpoint(path=path, **meta))

    # ------------------------------------------------------------------ resume
    def _save_state(self, opt: torch.optim.Optimizer, sched: Any, epoch: int) -> None:
        if self.checkpoint_dir is None:
            return
        names = {p: n for n, p in self._model.named_parameters()}
        order = [[names[p] for p in g["params"]] for g in opt.param_groups]
        atomic_save(growth_payload(
            self._model, {}, state=True, epoch=epoch, optimizer=opt.state_dict(), param_order=order,
            scheduler=sched.state_dict(), checkpoints=[asdict(c) for c in self.checkpoints_],
            expansions=self.expansions_, history=self.history_, checks=self._checks, config=self.config(),
        ), self.checkpoint_dir / "state.pt")

    def _load_state(self, model: nn.Module, device: torch.device) -> tuple[nn.Module, Optional[dict]]:
        if self.checkpoint_dir is None:
            raise ValueError("resume=True needs checkpoint_dir=<the directory of the interrupted run>")
        path = self.checkpoint_dir / "state.pt"
        if not path.is_file():
            logger.warning("resume: no %s; starting from the beginning", path)
            return model, None
        # the model growth started from, resized to the grown shapes (depth: the zoo record has the blocks)
        model, state = read_growth(path, model=None if getattr(model, "nni_elastic_arch", None) else model, state=True)
        model = model.to(device)
        self._check_config(state.get("config"), path)
        self.checkpoints_ = [GrowthCheckpoint(**c) for c in state["checkpoints"]]
        self.expansions_, self.history_, self._checks = list(state["expansions"]), list(state["history"]), state["checks"]
        return model, state

    def _restore_optimizer(self, model: nn.Module, opt: torch.optim.Optimizer, sched: Any, state: dict) -> None:
        named = dict(model.named_parameters())
        for group, names in zip(opt.param_groups, state["param_order"]):
            group["params"] = [named[n] for n in names]
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])

