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
    >>> [(row["params"], row["accuracy"]) for row in result.rows]   # result.details: the GrowthResult
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from ..checkpoint import atomic_save, growth_payload, read_growth
from ..device import resolve_device
from ..expansion.ops import add_block, update_optimizer, widen_group
from ..expansion.score import FisherGram, _check_inputs, per_sample_gradients
from ..elastic import ElasticModel
from ..graph import build_channel_graph
from ..measure import count_macs
from ..options import check_options, option
from ..training import TrainConfig, evaluate, make_optimizer, make_scheduler, seed_everything, train
from ._base import StepInfo, Strategy, StrategyResult, example_from, num_samples, register_strategy

__all__ = ["ExpansionGrowth", "ExpansionGrowthOptions", "GrowthCheckpoint", "GrowthResult", "GrowthState",
           "load_growth_checkpoint", "CANDIDATE_KINDS"]

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
    """The growth run in detail (``ExpansionGrowth.fit(...).details``)."""

    model: nn.Module
    checkpoints: list[GrowthCheckpoint]
    expansions: list[dict[str, Any]]
    history: list[dict[str, Any]]
    widths_only: bool = field(default=True)

    def elastic_model(self, example_inputs: torch.Tensor, calibration: Optional[Any] = None) -> ElasticModel:
        """The growth stages as nested levels of one ElasticModel (width-only growth).

        New channels are appended after the old ones, so each earlier stage's channel counts are a
        prefix of the final model's. The levels slice the *final* weights (old channels have kept
        training after later growth), so their accuracy differs from the checkpoints': pass
        ``calibration`` batches to recompute BatchNorm statistics, and evaluate them. Depth growth
        (added blocks) cannot be expressed as levels: an ElasticModel has no skippable layers yet.
        """
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


def _check_candidates(value: Any, label: str) -> None:
    if not value:
        raise ValueError(f"{label}: use a non-empty subset of {list(CANDIDATE_KINDS)}")


@dataclass
class ExpansionGrowthOptions:
    """Settings of expansion-score growth (the recipe's ``strategy:`` section); see :class:`ExpansionGrowth`."""

    epochs: int = option(10, ge=0)
    threshold: float = option(0.03, ge=0)
    check_every: int = option(100, ge=1)
    warmup_steps: Optional[int] = option(None, ge=0)
    max_params: Optional[int] = option(None, ge=1)
    max_macs: Optional[int] = option(None, ge=1)
    damping: float = option(1.0, gt=0)
    size_penalty: float = option(0.0, ge=0)
    score_batch: int = option(64, ge=2)
    candidates: list = option(default_factory=lambda: list(CANDIDATE_KINDS), choices=CANDIDATE_KINDS,
                              check=_check_candidates)
    width_fraction: float = option(0.25, gt=0, le=4)

    def __post_init__(self) -> None:
        self.candidates = list(self.candidates)
        check_options(self)


@dataclass
class GrowthState:
    """The state of one growth run (created empty with the strategy; :meth:`ExpansionGrowth.fit` fills it)."""

    model: Optional[nn.Module] = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    example: Optional[torch.Tensor] = None
    train_data: Any = None
    val_data: Any = None
    steps_per_epoch: int = 1
    num_checks: int = 0
    expansions: list[dict[str, Any]] = field(default_factory=list)
    checkpoints: list[GrowthCheckpoint] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    checks: list[dict[str, Any]] = field(default_factory=list)
    candidate_ops: dict[str, Callable[[nn.Module], list]] = field(default_factory=dict)  # of the last check


@register_strategy("expansion_growth")
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
        epochs: training epochs.
        lr, batch_size, optimizer, momentum, weight_decay, seed: training settings (or ``train=TrainConfig(...)``).
        device, quiet, checkpoint_dir, on_step_end: as for every strategy
            (``on_step_end`` is called after each epoch).
    """

    Options = ExpansionGrowthOptions

    def __init__(self, threshold: Optional[float] = None, **settings: Any) -> None:
        if threshold is not None:
            settings["threshold"] = threshold
        super().__init__(**settings)
        self.state_ = GrowthState()

    @property
    def warmup_steps(self) -> int:
        o = self.options
        return 2 * o.check_every if o.warmup_steps is None else o.warmup_steps

    @property
    def cfg(self) -> TrainConfig:
        """The training settings of the run (the strategy's ``epochs``)."""
        return dataclasses.replace(self.train, epochs=self.options.epochs)

    # the records of the last run, as public attributes
    checks_ = property(lambda self: self.state_.checks)
    expansions_ = property(lambda self: self.state_.expansions)
    checkpoints_ = property(lambda self: self.state_.checkpoints)
    history_ = property(lambda self: self.state_.history)

    def config(self) -> dict[str, Any]:
        """The settings that determine a run, as plain data (stored in the resume state)."""
        o, t = self.options, self.train
        return {"threshold": float(o.threshold), "check_every": o.check_every, "warmup_steps": self.warmup_steps,
                "max_params": o.max_params, "max_macs": o.max_macs, "damping": float(o.damping),
                "size_penalty": float(o.size_penalty), "score_batch": o.score_batch, "candidates": list(o.candidates),
                "width_fraction": float(o.width_fraction), "seed": t.seed, "epochs": o.epochs, "lr": t.lr,
                "batch_size": t.batch_size, "optimizer": t.optimizer, "momentum": t.momentum,
                "weight_decay": t.weight_decay}

    # ------------------------------------------------------------------ scoring
    def _score_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        st = self.state_
        data = st.train_data
        seed = self.seed + 7919 * (len(st.expansions) + 1) + st.num_checks
        loader = DataLoader(data.dataset if isinstance(data, DataLoader) else data, batch_size=self.options.score_batch,
                            shuffle=True, generator=torch.Generator().manual_seed(seed))
        x, y = next(iter(loader))
        return x.to(st.device), y.to(st.device)

    def _candidates(self, model: nn.Module, example: torch.Tensor,
                    calibration: Optional[torch.Tensor] = None) -> list[tuple[str, Callable[[nn.Module], list]]]:
        """Every function-preserving expansion of ``model``: ``(name, apply)`` pairs."""
        out: list[tuple[str, Callable[[nn.Module], list]]] = []
        if "depth" in self.options.candidates and hasattr(model, "add_block"):
            for s in range(len(model.stages)):
                out.append((f"depth:stage{s}", lambda m, s=s: add_block(m, s, calibration=calibration)))
        if "width" in self.options.candidates:
            graph = build_channel_graph(model, example)
            for g in graph.groups:
                k = max(1, math.ceil(self.options.width_fraction * g.size))

                def grow(m: nn.Module, name: str = g.name, k: int = k) -> list:
                    return widen_group(m, build_channel_graph(m, example).group(name), k)

                out.append((f"width:{g.name}+{k}", grow))
        return out

    def check(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
              example: Optional[torch.Tensor] = None) -> dict[str, Any]:
        """Score the current model and every candidate on one batch; return the decision record.

        Works on any model, inside a run or not (``example``: the tracing input, default ``x[:1]``).
        Every expansion preserves the function, so the per-sample gradients of the old parameters
        are the same in the expanded model: its Gram matrix is the current one plus the Gram of the
        new entries only, K_c = K + G_new G_new^T. Only the grown tensors are differentiated.
        """
        o = self.options
        _check_inputs(x, y, o.damping, "absolute")
        example = example if example is not None else x[:1]
        lam = o.damping
        current = FisherGram.of(model, x, y)
        eta = current.score(lam)
        params, best = _num_params(model), None
        scores = {}
        # new blocks take their BatchNorm statistics from the score batch; the chosen one is applied as scored
        ops = dict(self._candidates(model, example, calibration=x))
        self.state_.candidate_ops = ops
        for name, apply in ops.items():
            trial = copy.deepcopy(model)
            rng = torch.get_rng_state()
            changes = apply(trial)
            torch.set_rng_state(rng)
            added = _num_params(trial) - params
            if o.max_params is not None and params + added > o.max_params:
                continue
            if o.max_macs is not None and count_macs(trial, example) > o.max_macs:
                continue
            eta_c = _expanded_gram(trial, changes, current, x, y).score(lam)
            gain = eta_c - eta - o.size_penalty * added / params
            scores[name] = {"eta": eta_c, "gain": gain, "ratio": eta_c / max(eta, 1e-12), "added_params": added}
            if best is None or gain > scores[best]["gain"]:
                best = name
        take = best is not None and scores[best]["gain"] > o.threshold
        return {"eta": eta, "lambda": lam, "candidates": scores, "best": best, "expand": take}

    # ------------------------------------------------------------------ fit
    def fit(self, model: nn.Module, train_data: Dataset | DataLoader, val_data: Dataset | DataLoader, *,
            resume: bool = False, example_inputs: Optional[torch.Tensor] = None) -> StrategyResult:
        """Train with growth checks: one checkpoint per complexity level.

        Returns the :class:`StrategyResult` (one row per complexity level; ``elastic_model`` when
        growth was width-only); ``result.details`` is the :class:`GrowthResult` (final model,
        checkpoints, expansions, history).
        """
        device = resolve_device(self.device)
        cfg = self.cfg
        example = (example_inputs if example_inputs is not None else example_from(train_data)).to(device)
        steps_per_epoch = math.ceil(num_samples(train_data) / cfg.batch_size)
        st = self.state_ = GrowthState(device=device, example=example, train_data=train_data, val_data=val_data,
                                       steps_per_epoch=steps_per_epoch)
        model = model.to(device)
        start_epoch, saved = 0, None
        if resume:
            model, saved = self._load_state(model, device)
            start_epoch = saved["epoch"] if saved else 0
        st.model = model
        opt = make_optimizer([p for p in model.parameters() if p.requires_grad], cfg)
        sched = make_scheduler(opt, cfg, steps_per_epoch)
        if saved is not None:
            self._restore_optimizer(model, opt, sched, saved)
        seed_everything(self.seed + start_epoch)

        total_steps = cfg.epochs * steps_per_epoch

        def after_step(optimizer: torch.optim.Optimizer, step: int) -> None:
            due = step >= self.warmup_steps and step % self.options.check_every == 0 and step < total_steps
            if due and not self._budget_reached():
                self._grow(optimizer, step)

        def on_epoch_end(epoch: int, record: dict) -> None:
            st.history.append(dict(record))
            self._save_state(opt, sched, epoch + 1)
            self._notify(StepInfo(f"epoch_{epoch + 1}", epoch, cfg.epochs, record.get("val_accuracy"),
                                  {"params": _num_params(st.model), "expansions": len(st.expansions)}))

        train(model, train_data, val_data, cfg, device=device, quiet=self.quiet, desc="grow",
              after_step=after_step, on_epoch_end=on_epoch_end, optimizer=opt, scheduler=sched, start_epoch=start_epoch)
        if not st.checkpoints or st.checkpoints[-1].expansion is not None:  # the final level
            self._checkpoint(total_steps, cfg.epochs, None)
        self.report_ = [asdict(c) for c in st.checkpoints]
        widths_only = all(e["kind"] == "width" for e in st.expansions)
        growth = GrowthResult(st.model.eval(), list(st.checkpoints), list(st.expansions), list(st.history), widths_only)
        return self._result(growth, example_inputs)

    def _result(self, fitted: GrowthResult, example_inputs: Optional[torch.Tensor] = None) -> StrategyResult:
        """The run as a :class:`StrategyResult`: one row per complexity level; an elastic model when
        growth was width-only (its levels are the growth stages)."""
        rows = [dict(r, width=None) for r in self.report()]
        em = None
        if fitted.widths_only and fitted.expansions:
            example = example_inputs if example_inputs is not None else self.state_.example
            em = fitted.elastic_model(example.to(self.state_.device))
        records = {"expansions": fitted.expansions, "checks": self.checks_}
        return StrategyResult(elastic_model=em, rows=rows, checkpoints=[asdict(c) for c in fitted.checkpoints],
                              records=records, model=fitted.model, metadata={"growth": rows}, details=fitted)

    def _budget_reached(self) -> bool:
        return self.options.max_params is not None and _num_params(self.state_.model) >= self.options.max_params

    def _grow(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        st = self.state_
        model = st.model
        x, y = self._score_batch()
        st.num_checks += 1
        decision = self.check(model, x, y, example=st.example)
        best = decision["best"]
        st.checks.append({"step": step, "eta": decision["eta"], "best": best,
                          "gain": decision["candidates"][best]["gain"] if best else None, "expanded": decision["expand"]})
        logger.info("growth check at step %d: eta=%.4f best=%s", step, decision["eta"], decision["best"])
        if not decision["expand"]:
            return
        graph_before = {g.name: g.size for g in build_channel_graph(model, st.example).groups}
        self._checkpoint(step, step // max(1, st.steps_per_epoch), best)
        was_training = model.training
        changes = st.candidate_ops[best](model)
        model.train(was_training)
        update_optimizer(optimizer, changes)
        graph_after = {g.name: g.size for g in build_channel_graph(model, st.example).groups}
        st.expansions.append({"step": step, "name": best, "kind": best.split(":")[0], "eta": decision["eta"],
                              "gain": decision["candidates"][best]["gain"], "params": _num_params(model),
                              "channels_before": graph_before, "channels_after": graph_after})

    def _checkpoint(self, step: int, epoch: int, expansion: Optional[str]) -> None:
        st = self.state_
        model = st.model
        acc = evaluate(model, st.val_data, device=st.device)["accuracy"]
        level = len(st.checkpoints)
        path = None
        meta = {"level": level, "params": _num_params(model), "macs": count_macs(model, st.example), "accuracy": acc,
                "step": step, "epoch": epoch, "expansion": expansion}
        if self.checkpoint_dir is not None:
            path = self.checkpoint_dir / f"level{level}.pt"
            atomic_save(growth_payload(model, meta), path)
            path = str(path)
        st.checkpoints.append(GrowthCheckpoint(path=path, **meta))

    # ------------------------------------------------------------------ resume
    def _save_state(self, opt: torch.optim.Optimizer, sched: Any, epoch: int) -> None:
        if self.checkpoint_dir is None:
            return
        st = self.state_
        names = {p: n for n, p in st.model.named_parameters()}
        order = [[names[p] for p in g["params"]] for g in opt.param_groups]
        atomic_save(growth_payload(
            st.model, {}, state=True, epoch=epoch, optimizer=opt.state_dict(), param_order=order,
            scheduler=sched.state_dict(), checkpoints=[asdict(c) for c in st.checkpoints],
            expansions=st.expansions, history=st.history, checks=st.num_checks, config=self.config(),
        ), self.checkpoint_dir / "state.pt")

    def _load_state(self, model: nn.Module, device: torch.device) -> tuple[nn.Module, Optional[dict]]:
        if self.checkpoint_dir is None:
            raise ValueError("resume=True needs checkpoint_dir=<the directory of the interrupted run>")
        path = self.checkpoint_dir / "state.pt"
        if not path.is_file():
            logger.warning("resume: no %s; starting from the beginning", path)
            return model, None
        # the model growth started from, resized to the grown shapes (depth: the zoo record has the blocks)
        model, saved = read_growth(path, model=None if getattr(model, "nni_elastic_arch", None) else model, state=True)
        model = model.to(device)
        self._check_config(saved.get("config"), path)
        st = self.state_
        st.checkpoints = [GrowthCheckpoint(**c) for c in saved["checkpoints"]]
        st.expansions, st.history, st.num_checks = list(saved["expansions"]), list(saved["history"]), saved["checks"]
        return model, saved

    def _restore_optimizer(self, model: nn.Module, opt: torch.optim.Optimizer, sched: Any, state: dict) -> None:
        named = dict(model.named_parameters())
        for group, names in zip(opt.param_groups, state["param_order"]):
            group["params"] = [named[n] for n in names]
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
