"""Expansion-score growth (SECNN, arXiv 2401.05686, after SENN, arXiv 2307.04526).

Start small and grow during training, never restarting it. At each growth check the natural
expansion score eta (see :mod:`nni_elastic.expansion.score`) of the current model is compared with
that of candidate expansions, each function-preserving:

* a new identity-initialised block in a stage of a ``growable_cnn`` / ``secnn_cnn`` (SECNN's depth
  growth; its BatchNorm is set from the score batch so that train mode is preserved too);
* more channels in a channel group of the dependency graph (SENN's width growth, here on any
  traceable CNN), or in every convolution of a stage at once (``width_scope="stage"``, SECNN).

A candidate is scored on its expanded parameters with the same damping lambda as the current
model. Three criteria (``criterion``):

* ``"gain"`` (default): exact empirical Fisher (Woodbury), expand when the absolute increase
  ``eta_c - eta - size_penalty * dp`` exceeds ``threshold`` (``dp`` = added / current params).
* ``"ratio"``: exact empirical Fisher, expand when
  ``eta_c * exp(-size_lambda * n^2) / eta > tau`` (SECNN's criterion on the exact score; ``n`` the
  number of parameters the candidate adds).
* ``"secnn"``: SECNN as published (sec. 3): the *diagonal* empirical Fisher
  (:class:`~nni_elastic.expansion.score.DiagonalFisher`, damping relative to its mean entry), the
  ratio criterion with the multiplicative size regularisation ``eta_c * exp(-size_lambda * n^2)``.
  SECNN checks once per epoch (``check_per_epoch``) with a cooldown between expansions
  (``cooldown``), initialises new layers as the identity plus small noise (``new_layer_noise``) and
  adds a few channels to every convolution of a block (``width_scope: stage``,
  ``width_increment``); ``strategies/expansion_growth/*_secnn.yaml`` set all of these.

What ``"secnn"`` still does differently from the paper (the sources we could read do not give
these details, or we chose otherwise for a stated reason):

* the Fisher is estimated on ``score_batch`` random training samples per check, not the whole set;
* the diagonal is damped by ``damping`` times its mean entry (entries with no variance would
  otherwise divide by zero);
* every candidate (a layer in each block, a channel increment in each block) is scored as a whole
  model and the best regularised ratio wins; the paper's order of "where" and "what" may differ;
* a new layer's BatchNorm is set from a training batch so that the layer is the identity in train
  mode too (the paper: identity initialisation);
* ``tau``, ``size_lambda``, the noise level, the increment and the cooldown length are ours (the
  recipes say which values are the paper's); ``secnn_cnn``'s pooling and skip details are ours
  (:mod:`nni_elastic.models.secnn`).

Why the absolute increase at a fixed lambda is our default (PAPERS.md, "a pitfall"): eta is the
first-order loss decrease of one damped natural-gradient step, so with lambda fixed for the run
(``damping``) Delta eta is the extra decrease the new parameters would buy, about
``|g_new|^2 / lambda``; it shrinks as a model fits its data. We measured on digits
(growable_cnn trained 10 epochs, N=128, lambda=1): best Delta eta = 0.049, 0.033, 0.015, 0.010
for channels (2,4,4), (4,8,8), (16,32,32), (32,64,64), while the ratio eta_c / eta - 1 grows
with size (0.175, 0.172, 0.297, 0.301). So the threshold on Delta eta makes growth selective: a
network that is already big enough does not grow (tests check both directions, for every
criterion).

When to grow (the schedule; benchmarks/README.md has the measurements): checks start after
``warmup_steps`` and stop after ``grow_until`` (a fraction of the run's steps): capacity added
late in a decaying learning-rate schedule is barely trained, so growth happens early and the
final architecture trains for the rest of the run. ``max_expansions`` caps the number of
expansions. Each expansion closes a complexity level: the model just before it is evaluated and
checkpointed, so one run yields checkpoints at several sizes.

Cost: the current model's per-sample gradients are computed once per check; each width candidate
only differentiates its new entries (K_c = K + G_new G_new^T, exact: widening preserves the
function, so the old entries' gradients do not change). Depth candidates are rescored in full,
since a new layer's noise (and ``secnn_cnn``'s LeakyReLU) changes the function slightly. With ``candidate_top_k``, width
candidates are first ranked by a free proxy (the diagonal natural score, per channel, of the
group's existing outgoing weights, read from the current model's per-sample gradients) and only
the ``k`` best are scored exactly; depth candidates are always scored.

What a checkpoint of an earlier level holds (``history``): with ``"snapshot"`` the model as it was
when the expansion that closed the level was applied, early in the run and barely trained (SECNN's
checkpoints). By default (``"nested"``) the closed level stays inside the growing model as a nested
sub-network (:mod:`nni_elastic.expansion.nested`: width growth appends channels, so the old
model is a channel prefix; depth growth appends blocks, so it is the new model with them
skipped) and keeps training until the end: each optimizer step trains the model on the labels
and ``history_per_step`` history levels in turn on its detached soft predictions (in-place
distillation, as prune-and-grow's joint step does for its levels), in one backward pass; the
number of optimizer steps is unchanged, each costs the history levels' MACs more
(``StrategyResult.compute``). The levels keep their own BatchNorm running statistics and, by
default (``history_bn="private"``), their own BatchNorm weights and biases. The defaults
(``history_smallest``: the smallest level at every step plus one other in turn; private
BatchNorm) are what measured best on Fashion-MNIST (benchmarks/README.md, 5 seeds: the final
network -0.39 pp from a fixed one of its architecture trained as long, the earlier levels'
checkpoints -0.26 pp from fixed networks of their size, in the mean); with several processes the
levels' own tensors are averaged over them. At the end each level's checkpoint
file is rewritten with its final weights (BatchNorm statistics recomputed as for snapshots): same
format, same loader, ``step`` the run's last step, ``closed_at`` and ``snapshot_accuracy`` the
moment it was closed.

The applied expansion is the scored one: the chosen candidate's model (new tensors, new
BatchNorm statistics) is kept from the check and copied into the model when it is applied, so
whatever runs in between (evaluation, checkpointing, other random draws) cannot change it.

Deviations: SENN scores new neurons with a K-FAC Fisher and chooses their initialisation to
maximise the score; we score whole candidate models with random new incoming weights. SECNN's
size term ``exp(-lambda_n dp^2)`` counts added parameters (``n`` here, so ``size_lambda`` is per
squared parameter, e.g. 1e-9): it penalises large additions, which is what keeps the ratio
criterion from growing big networks (their ratio is not smaller; measured below). The additive
``size_penalty`` of the gain criterion uses the relative increase dp = n / current params. The
optimizer state of old parameters is carried over; new entries start with zero momentum/moments.

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
from ..distributed import from_main, mean_, sync_buffers
from ..expansion.nested import NestedLevel, choose_levels, nested_step
from ..expansion.ops import ParamChange, add_block, update_optimizer, widen_group
from ..expansion.score import DiagonalFisher, FisherGram, _check_inputs, per_sample_gradients
from ..elastic import ElasticModel
from ..graph import build_channel_graph
from ..measure import count_macs
from ..options import check_options, option
from ..training import TrainConfig, evaluate, make_optimizer, make_scheduler, seed_everything, train
from ._base import StepInfo, Strategy, StrategyResult, example_from, num_samples, register_strategy

__all__ = ["ExpansionGrowth", "ExpansionGrowthOptions", "GrowthCheckpoint", "GrowthResult", "GrowthState",
           "load_growth_checkpoint", "CANDIDATE_KINDS", "CRITERIA"]

logger = logging.getLogger(__name__)

CANDIDATE_KINDS = ("depth", "width")
CRITERIA = ("gain", "ratio", "secnn")
WIDTH_SCOPES = ("group", "stage")
LR_SCHEDULES = ("global", "cycles")
HISTORY_MODES = ("snapshot", "nested")
HISTORY_BN = ("shared", "private")


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
    closed_at: Optional[int] = None  # the optimizer step of that expansion (history="nested": ``step`` is the run's end)
    snapshot_accuracy: Optional[float] = None  # history="nested": the level's accuracy when it was closed


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
        training after later growth), so with ``history="snapshot"`` their accuracy differs from
        the checkpoints'. With ``"nested"`` the levels were trained as such: the checkpoints hold
        the same convolution weights, but with ``history_bn="private"`` (the default) also the
        levels' own BatchNorm weights, which an ElasticModel level does not have (it slices the
        final model's): the checkpoints are the levels as trained. Pass ``calibration`` batches to
        recompute BatchNorm statistics, and evaluate the levels. Depth growth
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


def _new_entry_gradients(trial: nn.Module, changes: list[ParamChange], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The N x P_new per-sample gradients of the entries an expansion added (only those tensors are differentiated).

    A tensor changed several times (a conv that consumes one grown group and produces another)
    has one change per step, each on the previous step's tensor: the masks of new entries are
    carried through the chain.
    """
    masks: dict[int, torch.Tensor] = {}
    for c in changes:
        if c.old is None:
            masks[id(c.new)] = torch.ones_like(c.new, dtype=torch.bool)
            continue
        base = masks.pop(id(c.old), None)
        if base is None:
            base = torch.zeros_like(c.old, dtype=torch.bool)
        shape = list(base.shape)
        shape[c.dim] = c.count
        block = torch.ones(shape, dtype=torch.bool, device=base.device)
        masks[id(c.new)] = torch.cat([base.narrow(c.dim, 0, c.index), block,
                                      base.narrow(c.dim, c.index, base.shape[c.dim] - c.index)], dim=c.dim)
    names = [(n, masks[id(p)]) for n, p in trial.named_parameters() if id(p) in masks]
    g = per_sample_gradients(trial, x, y, params=[n for n, _ in names])
    return g[:, torch.cat([m.flatten() for _, m in names])]


def _expanded_gram(trial: nn.Module, changes: list, current: FisherGram, x: torch.Tensor, y: torch.Tensor) -> FisherGram:
    """The Gram matrix of an expanded model from the current one plus the new entries' gradients."""
    return current.extended(_new_entry_gradients(trial, changes, x, y))


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _check_candidates(value: Any, label: str) -> None:
    if not value:
        raise ValueError(f"{label}: use a non-empty subset of {list(CANDIDATE_KINDS)}")


@dataclass
class ExpansionGrowthOptions:
    """Settings of expansion-score growth (the recipe's ``strategy:`` section); see :class:`ExpansionGrowth`."""

    epochs: int = option(10, ge=0)
    criterion: str = option("gain", choices=CRITERIA)
    threshold: float = option(0.03, ge=0)
    tau: float = option(1.0, gt=0)
    size_penalty: float = option(0.0, ge=0)
    size_lambda: float = option(0.0, ge=0)
    check_every: int = option(50, ge=1)
    check_per_epoch: bool = option(False)
    warmup_steps: Optional[int] = option(None, ge=0)
    grow_until: float = option(0.15, gt=0, le=1)
    cooldown: int = option(0, ge=0)
    max_expansions: Optional[int] = option(None, ge=0)
    max_params: Optional[int] = option(None, ge=1)
    max_macs: Optional[int] = option(None, ge=1)
    damping: float = option(1.0, gt=0)
    score_batch: int = option(64, ge=2)
    candidates: list = option(default_factory=lambda: list(CANDIDATE_KINDS), choices=CANDIDATE_KINDS,
                              check=_check_candidates)
    candidate_top_k: Optional[int] = option(2, ge=1)
    width_fraction: float = option(0.25, gt=0, le=4)
    width_increment: Optional[int] = option(None, ge=1)
    width_scope: str = option("group", choices=WIDTH_SCOPES)
    new_layer_noise: float = option(0.0, ge=0)
    lr_schedule: str = option("global", choices=LR_SCHEDULES)
    checkpoint_bn_batches: int = option(20, ge=0)
    history: str = option("nested", choices=HISTORY_MODES)
    history_per_step: Optional[int] = option(1, ge=1)
    history_smallest: bool = option(True)
    history_distill: float = option(1.0, ge=0, le=1)
    history_weight: float = option(1.0, gt=0)
    history_bn: str = option("private", choices=HISTORY_BN)

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
    scored: Optional[tuple[str, nn.Module]] = None  # the last check's best candidate, as scored
    cooldown_left: int = 0
    segment: tuple[int, int] = (0, 1)  # lr_schedule="cycles": the current cosine cycle's first and last step
    levels: list[NestedLevel] = field(default_factory=list)  # history="nested": the earlier architectures
    level_macs: list[int] = field(default_factory=list)
    model_macs: int = 0
    steps_done: int = 0
    mac_samples: float = 0.0  # forward MACs x samples of the training steps (checks not included)


@register_strategy("expansion_growth")
class ExpansionGrowth(Strategy):
    """Grow a small CNN during training where the natural expansion score says capacity helps.

    Args:
        criterion: ``"gain"`` (exact Fisher, absolute increase), ``"ratio"`` (exact Fisher, SECNN's
            ratio) or ``"secnn"`` (diagonal Fisher, SECNN's ratio); see the module docstring.
        threshold: ``"gain"``: minimum increase of eta (after the size penalty) to expand (>= 0).
        tau: ``"ratio"``/``"secnn"``: expand when ``eta_c * exp(-size_lambda * n^2) / eta > tau``
            (``n``: parameters the candidate adds).
        size_penalty: ``"gain"``: cost per relative parameter increase n / params subtracted from the gain.
        size_lambda: ``"ratio"``/``"secnn"``: SECNN's lambda_n in ``exp(-lambda_n * n^2)``, per squared parameter.
        check_every: optimizer steps between growth checks (default 50: frequent, but only in the
            first ``grow_until`` of the run).
        check_per_epoch: check once per epoch instead (SECNN).
        warmup_steps: optimizer steps before the first check (default: ``2 * check_every``).
        grow_until: no checks after this fraction of the run's optimizer steps (default 0.15: grow
            early, then train the final architecture; see benchmarks/README.md).
        cooldown: checks skipped after an expansion.
        max_expansions: at most this many expansions.
        max_params, max_macs: budget; candidates that would exceed it are not taken.
        damping: ``"gain"``/``"ratio"``: the absolute Fisher damping lambda, fixed for the run;
            ``"secnn"``: relative to the mean diagonal Fisher entry.
        score_batch: samples N of the score (the Gram matrix is N x N).
        candidates: expansion kinds, ``"depth"`` (growable_cnn/secnn_cnn blocks) and/or ``"width"``.
        candidate_top_k: score only the k width candidates ranked best by the free proxy (default
            2; ``None``: all).
        width_fraction: channels added to a group, as a fraction of its size (at least 1).
        width_increment: channels added to a group (overrides ``width_fraction``).
        width_scope: ``"group"`` (one candidate per channel group) or ``"stage"`` (one per stage
            ``stages.<i>``: every group rooted in it grows at once, SECNN).
        new_layer_noise: standard deviation of the noise added to a new layer's identity conv.
        lr_schedule: ``"global"``: one cosine decay over the run (the ``train`` schedule);
            ``"cycles"``: while growth is possible, one cosine cycle per check interval (the model
            is annealed at every check, so each checkpoint is a finished model, and the learning
            rate is re-warmed after an expansion); after the last possible growth one cycle to the end.
        checkpoint_bn_batches: intermediate checkpoints get BatchNorm statistics recomputed on this
            many training batches (a copy; 0: the running statistics as they are).
        history: ``"snapshot"``: an intermediate checkpoint is the model as it was when an
            expansion closed its level; ``"nested"`` (default): each closed level stays a nested
            sub-network of the growing model (a channel prefix, added blocks skipped) and keeps
            training with it until the end (in-place distillation from the grown model); its
            checkpoint holds its final weights (:mod:`nni_elastic.expansion.nested`).
        history_per_step: ``"nested"``: history levels trained per optimizer step, in turn
            (default 1; ``None``: all of them every step).
        history_smallest: ``"nested"``: the smallest level at every step, plus ``history_per_step``
            of the others in turn (the sandwich rule's smallest network; default True).
        history_distill: ``"nested"``: share of distillation in a history level's loss
            (1: the grown model's soft predictions only; 0: the labels only).
        history_weight: ``"nested"``: factor of the history levels' losses against the model's.
        history_bn: ``"nested"``: ``"shared"``: a history level's BatchNorm weights and biases
            are slices of the model's (its running statistics are always its own);
            ``"private"`` (default): its own, trained with it (switchable BatchNorm).
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
        out = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in asdict(o).items()}
        out["warmup_steps"] = self.warmup_steps
        out.update({"seed": t.seed, "lr": t.lr, "batch_size": t.batch_size, "optimizer": t.optimizer,
                    "momentum": t.momentum, "weight_decay": t.weight_decay})
        return out

    # ------------------------------------------------------------------ scoring
    def _score_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        st = self.state_
        data = st.train_data
        seed = self.seed + 7919 * (len(st.expansions) + 1) + st.num_checks
        loader = DataLoader(data.dataset if isinstance(data, DataLoader) else data, batch_size=self.options.score_batch,
                            shuffle=True, generator=torch.Generator().manual_seed(seed))
        x, y = next(iter(loader))
        return x.to(st.device), y.to(st.device)

    def _width_count(self, size: int) -> int:
        o = self.options
        return o.width_increment if o.width_increment is not None else max(1, math.ceil(o.width_fraction * size))

    def _candidates(self, model: nn.Module, example: torch.Tensor,
                    calibration: Optional[torch.Tensor] = None) -> list[tuple[str, Callable[[nn.Module], list]]]:
        """Every function-preserving expansion of ``model``: ``(name, apply)`` pairs."""
        return [(name, apply) for name, apply, _ in self._candidate_list(model, example, calibration)]

    def _candidate_list(self, model: nn.Module, example: torch.Tensor, calibration: Optional[torch.Tensor] = None
                        ) -> list[tuple[str, Callable[[nn.Module], list], dict[str, int]]]:
        """``(name, apply, {width group: channels added})`` for every candidate expansion."""
        o = self.options
        out: list[tuple[str, Callable[[nn.Module], list], dict[str, int]]] = []
        if "depth" in o.candidates and hasattr(model, "add_block"):
            for s in range(len(model.stages)):
                out.append((f"depth:stage{s}", lambda m, s=s: add_block(m, s, calibration=calibration, noise=o.new_layer_noise), {}))
        if "width" in o.candidates:
            groups = build_channel_graph(model, example).groups
            if o.width_scope == "stage":
                units: dict[str, list] = {}
                for g in groups:  # a group belongs to the stage of its producers (a skip's 1x1 conv may be its root)
                    stages = sorted({m.module.split(".")[1] for m in g.members if m.dim == "out"
                                     and m.module.startswith("stages.") and m.module.split(".")[1].isdigit()}, key=int)
                    if stages:
                        units.setdefault(f"stage{stages[-1]}", []).append(g)
                sets = [(name, {g.name: self._width_count(g.size) for g in units[name]})
                        for name in sorted(units, key=lambda u: int(u[len("stage"):]))]
            else:
                sets = [(f"{g.name}+{self._width_count(g.size)}", {g.name: self._width_count(g.size)}) for g in groups]
            for label, counts in sets:
                def grow(m: nn.Module, counts: dict[str, int] = counts) -> list:
                    changes: list = []
                    for name, k in counts.items():
                        changes += widen_group(m, build_channel_graph(m, example).group(name), k)
                    return changes

                out.append((f"width:{label}", grow, counts))
        return out

    @staticmethod
    def _proxy(model: nn.Module, example: torch.Tensor, terms: torch.Tensor, names: list[str],
               groups: list[str]) -> dict[str, float]:
        """Per channel group: the mean, over its channels, of ``terms`` summed over one channel's outgoing weights.

        New channels get zero outgoing weights whose gradient is (backprop signal) x (new
        activation), the same form as the existing outgoing weights' gradient, so groups whose
        outgoing weights carry much gradient per channel are the promising ones. ``terms``: one
        value per parameter entry (of ``names``, concatenated): the squared mean gradient for the
        exact-Fisher criteria (about what a new entry adds to eta at a large damping; Spearman
        0.63-0.83 with the exact gain over the width candidates of ResNet-20 and growable_cnn,
        against 0.37-0.55 for the diagonal natural score), the diagonal natural score for
        ``"secnn"``. Free: read from the per-sample gradients the current score needs anyway.
        """
        params = dict(model.named_parameters())
        offsets, pos = {}, 0
        for n in names:
            offsets[n] = (pos, params[n].shape)
            pos += params[n].numel()
        graph = build_channel_graph(model, example)
        out = {}
        for gname in groups:
            group = graph.group(gname)
            total = 0.0
            for member in group.members:
                key = f"{member.module}.weight" if member.module else "weight"
                if member.dim != "in" or key not in offsets:
                    continue
                start, shape = offsets[key]
                t = terms[start:start + math.prod(shape)].reshape(shape)
                cols = sorted({c for p in member.positions for c in p})
                total += float(t[:, cols].sum())
            out[gname] = total / max(1, group.size)
        return out

    def check(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
              example: Optional[torch.Tensor] = None) -> dict[str, Any]:
        """Score the current model and the candidates on one batch; return the decision record.

        Works on any model, inside a run or not (``example``: the tracing input, default ``x[:1]``).
        Widening preserves the function exactly, so the per-sample gradients of the old parameters
        are the same in the widened model: its Fisher is the current one extended by the new
        entries' gradients (K_c = K + G_new G_new^T, or the diagonal appended), and only the grown
        tensors are differentiated. Depth candidates are rescored in full. With
        ``candidate_top_k``, only the k width candidates the proxy ranks best are scored. The best
        candidate's model is kept so that :meth:`expand` applies exactly what was scored.
        """
        o = self.options
        _check_inputs(x, y, o.damping, "absolute")
        example = example if example is not None else x[:1]
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        g = per_sample_gradients(model, x, y, params=names)
        current = DiagonalFisher.from_gradients(g) if o.criterion == "secnn" else FisherGram.from_gradients(g)
        lam = current.damping(o.damping, "relative") if o.criterion == "secnn" else o.damping
        eta = current.score(lam)
        params, best, best_trial = _num_params(model), None, None
        scores: dict[str, dict[str, Any]] = {}
        listed = self._candidate_list(model, example, calibration=x)
        self.state_.candidate_ops = {name: apply for name, apply, _ in listed}
        ranked = None
        if o.candidate_top_k is not None:
            width = [(name, groups) for name, _, groups in listed if groups]
            if len(width) > o.candidate_top_k:
                terms = current.terms(lam) if isinstance(current, DiagonalFisher) else g.mean(0) ** 2
                proxy = self._proxy(model, example, terms, names, sorted({n for _, gs in width for n in gs}))
                order = sorted(width, key=lambda w: -sum(proxy[n] * k for n, k in w[1].items()))
                ranked = {name for name, _ in order[:o.candidate_top_k]}
        del g
        for index, (name, apply, groups) in enumerate(listed):
            if ranked is not None and groups and name not in ranked:
                continue
            trial = copy.deepcopy(model)
            with torch.random.fork_rng(devices=[]):  # scoring draws no global random numbers
                torch.manual_seed(self.seed + 1009 * self.state_.num_checks + index)
                changes = apply(trial)
            added = _num_params(trial) - params
            if o.max_params is not None and params + added > o.max_params:
                continue
            if o.max_macs is not None and count_macs(trial, example) > o.max_macs:
                continue
            if groups:  # width: exactly function-preserving, so only the new entries' gradients are new
                eta_c = current.extended(_new_entry_gradients(trial, changes, x, y)).score(lam)
            else:  # depth: a new layer's noise (and secnn_cnn's LeakyReLU) changes the old gradients a little
                eta_c = type(current).from_gradients(per_sample_gradients(trial, x, y)).score(lam)
            dp = added / params
            gain = eta_c - eta - o.size_penalty * dp
            ratio = eta_c * math.exp(-o.size_lambda * float(added) ** 2) / max(eta, 1e-300)
            scores[name] = {"eta": eta_c, "gain": gain, "ratio": ratio, "added_params": added}
            value = "gain" if o.criterion == "gain" else "ratio"
            if best is None or scores[name][value] > scores[best][value]:
                best, best_trial = name, trial
        if best is None:
            take = False
        elif o.criterion == "gain":
            take = scores[best]["gain"] > o.threshold
        else:
            take = scores[best]["ratio"] > o.tau
        self.state_.scored = (best, best_trial) if best is not None else None
        return {"eta": eta, "lambda": lam, "criterion": o.criterion, "candidates": scores, "best": best, "expand": take}

    def expand(self, model: nn.Module, name: Optional[str] = None,
               optimizer: Optional[torch.optim.Optimizer] = None) -> list[ParamChange]:
        """Apply the last :meth:`check`'s best candidate to ``model`` in place, exactly as it was scored.

        The expansion is applied (new parameter objects, in the optimizer when given) and then the
        scored candidate's tensors and buffers are copied in, so random draws, evaluation or
        checkpointing between the check and this call change nothing. ``name``: another
        candidate of that check (applied with fresh random new weights; only the best is kept).
        """
        scored = self.state_.scored
        if name is None:
            if scored is None:
                raise ValueError("expand: no scored candidate; call check(...) first")
            name = scored[0]
        ops = self.state_.candidate_ops
        if name not in ops:
            raise ValueError(f"expand: {name!r} is not a candidate of the last check; candidates: {sorted(ops)}")
        was_training = model.training
        with torch.random.fork_rng(devices=[]):
            changes = ops[name](model)
        model.train(was_training)
        if scored is not None and scored[0] == name:
            trial_state = scored[1].state_dict()
            if trial_state.keys() == model.state_dict().keys():
                model.load_state_dict(trial_state)
        if optimizer is not None:
            update_optimizer(optimizer, changes)
        return changes

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
        st.model_macs = count_macs(model, example)
        st.steps_done = start_epoch * steps_per_epoch
        total_steps = cfg.epochs * steps_per_epoch
        planned = self._planned_checks(total_steps)
        opt = make_optimizer([p for p in model.parameters() if p.requires_grad], cfg)
        if self.options.lr_schedule == "cycles":
            if saved is None:
                st.segment = (0, self._segment_end(0, planned, total_steps))
            sched = torch.optim.lr_scheduler.LambdaLR(opt, self._cycle_factor)
        else:
            sched = make_scheduler(opt, cfg, steps_per_epoch)
        if saved is not None:
            self._restore_optimizer(model, opt, sched, saved)
        seed_everything(self.seed + start_epoch)

        def after_step(optimizer: torch.optim.Optimizer, step: int) -> None:
            if step not in planned:
                return
            if self._check_due(step, total_steps):
                self._grow(optimizer, step)
            if self.options.lr_schedule == "cycles" and step == st.segment[1]:  # this cycle ends here
                st.segment = (step, self._segment_end(step, planned, total_steps))

        def on_epoch_end(epoch: int, record: dict) -> None:
            for level in st.levels:  # each process updated the levels' statistics on its shard (as train does the model's)
                sync_buffers(level.skeleton)
            st.history.append(dict(record))
            self._save_state(opt, sched, epoch + 1)
            self._notify(StepInfo(f"epoch_{epoch + 1}", epoch, cfg.epochs, record.get("val_accuracy"),
                                  {"params": _num_params(st.model), "expansions": len(st.expansions)}))

        train(model, train_data, val_data, cfg, step=self._train_step, device=device, quiet=self.quiet, desc="grow",
              after_step=after_step, on_epoch_end=on_epoch_end, optimizer=opt, scheduler=sched, start_epoch=start_epoch)
        if not st.checkpoints or st.checkpoints[-1].expansion is not None:  # the final level
            self._checkpoint(total_steps, cfg.epochs, None)
        self._export_nested(total_steps, cfg.epochs)
        self.report_ = [asdict(c) for c in st.checkpoints]
        # in epochs of the final model (a fixed network of the final size trained as long: cfg.epochs)
        self.compute_ = {"mac_samples": st.mac_samples,
                         "full_epochs": st.mac_samples / max(1, st.model_macs * num_samples(train_data))}
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
        return StrategyResult(elastic_model=em, rows=rows, compute=dict(self.compute_),
                              checkpoints=[asdict(c) for c in fitted.checkpoints],
                              records=records, model=fitted.model, metadata={"growth": rows}, details=fitted)

    def _budget_reached(self) -> bool:
        return self.options.max_params is not None and _num_params(self.state_.model) >= self.options.max_params

    def _planned_checks(self, total_steps: int) -> set[int]:
        """The steps at which a check may happen (before cooldown and budget)."""
        o, st = self.options, self.state_
        every = st.steps_per_epoch if o.check_per_epoch else o.check_every
        return {s for s in range(every, total_steps, every) if s >= self.warmup_steps and s <= o.grow_until * total_steps}

    def _growth_over(self) -> bool:
        o = self.options
        return (o.max_expansions is not None and len(self.state_.expansions) >= o.max_expansions) or self._budget_reached()

    def _segment_end(self, step: int, planned: set[int], total_steps: int) -> int:
        later = [s for s in planned if s > step]
        return total_steps if self._growth_over() or not later else min(later)

    def _cycle_factor(self, step: int) -> float:
        """The learning-rate factor of ``lr_schedule="cycles"``: cosine from 1 to 0 over the current cycle."""
        start, end = self.state_.segment
        t = min(1.0, max(0.0, (step - start) / max(1, end - start)))
        return 0.5 * (1.0 + math.cos(math.pi * t))

    def _check_due(self, step: int, total_steps: int) -> bool:
        o, st = self.options, self.state_
        every = st.steps_per_epoch if o.check_per_epoch else o.check_every
        if step < self.warmup_steps or step % every or step >= total_steps or step > o.grow_until * total_steps:
            return False
        if o.max_expansions is not None and len(st.expansions) >= o.max_expansions:
            return False
        if self._budget_reached():
            return False
        if st.cooldown_left > 0:
            st.cooldown_left -= 1
            return False
        return True

    def _grow(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        st = self.state_
        model = st.model
        x, y = self._score_batch()
        st.num_checks += 1
        # several processes: rank 0's decision everywhere (the grown weights follow with the next DDP wrap)
        decision = from_main(self.check(model, x, y, example=st.example))
        best = decision["best"]
        chosen = decision["candidates"][best] if best else {}
        by_ratio = max(decision["candidates"], key=lambda n: decision["candidates"][n]["ratio"], default=None)
        st.checks.append({"step": step, "eta": decision["eta"], "best": best, "gain": chosen.get("gain"),
                          "ratio": chosen.get("ratio"), "expanded": decision["expand"],
                          # the other criterion's view of the same check, to compare them on one run
                          "best_by_ratio": by_ratio,
                          "best_ratio": decision["candidates"][by_ratio]["ratio"] if by_ratio else None})
        logger.info("growth check at step %d: eta=%.4f best=%s", step, decision["eta"], decision["best"])
        if not decision["expand"]:
            return
        graph_before = {g.name: g.size for g in build_channel_graph(model, st.example).groups}
        self._checkpoint(step, step // max(1, st.steps_per_epoch), best)
        if self.options.history == "nested":  # the level just closed stays inside the model and keeps training
            level = NestedLevel(copy.deepcopy(model), private_bn=self.options.history_bn == "private")
            st.levels.append(level)
            st.level_macs.append(st.checkpoints[-1].macs)
            update_optimizer(optimizer, [ParamChange(None, p) for p in level.own_parameters().values()])
        self.expand(model, best, optimizer)
        st.model_macs = count_macs(model, st.example)
        st.scored = None
        st.cooldown_left = self.options.cooldown
        graph_after = {g.name: g.size for g in build_channel_graph(model, st.example).groups}
        st.expansions.append({"step": step, "name": best, "kind": best.split(":")[0], "eta": decision["eta"],
                              "eta_candidate": chosen["eta"], "gain": chosen["gain"], "ratio": chosen["ratio"],
                              "params": _num_params(model), "channels_before": graph_before,
                              "channels_after": graph_after})

    def _train_step(self, net: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One optimizer step's loss and backward: the model on the labels, plus (``history="nested"``) history levels in turn."""
        o, st = self.options, self.state_
        chosen = choose_levels(len(st.levels), st.steps_done, o.history_per_step, o.history_smallest)
        st.steps_done += 1
        st.mac_samples += float(x.shape[0]) * (st.model_macs + sum(st.level_macs[i] for i in chosen))
        loss = nested_step(net, [st.levels[i] for i in chosen], x, y, distill=o.history_distill, weight=o.history_weight,
                           base=st.model)
        # the levels' own parameters live outside DistributedDataParallel: average their gradients here
        # (the same levels, in the same order, on every process)
        mean_(p.grad for i in chosen for p in st.levels[i].own_parameters().values() if p.grad is not None)
        return loss

    def _export_nested(self, total_steps: int, epochs: int) -> None:
        """``history="nested"``: every history level's checkpoint becomes the level with its final weights (same files, same format)."""
        st = self.state_
        for i, level in enumerate(st.levels):
            c = st.checkpoints[i]
            st.checkpoints[i] = self._write_level(level.export(st.model), True, {
                "level": c.level, "params": c.params, "macs": c.macs, "step": total_steps, "epoch": epochs,
                "expansion": c.expansion, "closed_at": c.step, "snapshot_accuracy": c.accuracy})

    def _recalibrated(self, model: nn.Module) -> nn.Module:
        """A copy of ``model`` whose BatchNorm statistics are recomputed on ``checkpoint_bn_batches`` training batches.

        A snapshot taken at a high learning rate has running statistics that lag its weights
        (exponential average over past weights); averaging them afresh over a few batches, as SWA
        does, makes the checkpoint the model its weights describe. The training run is untouched.
        """
        copy_ = copy.deepcopy(model)
        bns = [m for m in copy_.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not bns:
            return copy_
        st, n = self.state_, self.options.checkpoint_bn_batches
        data = st.train_data.dataset if isinstance(st.train_data, DataLoader) else st.train_data
        loader = DataLoader(data, batch_size=self.train.batch_size, shuffle=True,
                            generator=torch.Generator().manual_seed(self.seed + 104729 + len(st.checkpoints)))
        momenta = [bn.momentum for bn in bns]
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average
        copy_.train()
        with torch.no_grad():
            for i, (x, _) in enumerate(loader):
                if i >= n:
                    break
                copy_(x.to(st.device))
        for bn, m in zip(bns, momenta):
            bn.momentum = m
        return copy_.train(model.training)

    def _checkpoint(self, step: int, epoch: int, expansion: Optional[str]) -> None:
        st = self.state_
        meta = {"level": len(st.checkpoints), "params": _num_params(st.model), "macs": count_macs(st.model, st.example),
                "step": step, "epoch": epoch, "expansion": expansion}
        # an intermediate level is a snapshot: its BatchNorm statistics are recomputed on a copy
        st.checkpoints.append(self._write_level(st.model, expansion is not None, meta))

    def _write_level(self, model: nn.Module, recalibrate: bool, meta: dict[str, Any]) -> GrowthCheckpoint:
        """Evaluate a level's model (``recalibrate``: a copy with recomputed BatchNorm statistics), write
        ``level{i}.pt`` when there is a checkpoint directory, and return its record."""
        st = self.state_
        if recalibrate and self.options.checkpoint_bn_batches:
            model = self._recalibrated(model)
        meta = {**meta, "accuracy": evaluate(model, st.val_data, device=st.device)["accuracy"]}
        path = None
        if self.checkpoint_dir is not None:
            path = self.checkpoint_dir / f"level{meta['level']}.pt"
            atomic_save(growth_payload(model, meta), path)
            path = str(path)
        return GrowthCheckpoint(path=path, **meta)

    # ------------------------------------------------------------------ resume
    def _save_state(self, opt: torch.optim.Optimizer, sched: Any, epoch: int) -> None:
        if self.checkpoint_dir is None:
            return
        st = self.state_
        names = {p: n for n, p in self._named_parameters()}
        order = [[names[p] for p in g["params"]] for g in opt.param_groups]
        atomic_save(growth_payload(
            st.model, {}, state=True, epoch=epoch, optimizer=opt.state_dict(), param_order=order,
            scheduler=sched.state_dict(), checkpoints=[asdict(c) for c in st.checkpoints],
            expansions=st.expansions, history=st.history, checks=st.num_checks, config=self.config(),
            cooldown_left=st.cooldown_left, segment=list(st.segment),
            nested_state=[lv.state() for lv in st.levels], level_macs=list(st.level_macs), mac_samples=st.mac_samples,
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
        st.cooldown_left = int(saved.get("cooldown_left", 0))
        st.segment = tuple(saved.get("segment", (0, 1)))
        st.mac_samples = float(saved.get("mac_samples", 0.0))
        st.level_macs = list(saved.get("level_macs", []))
        for c, own in zip(st.checkpoints, saved.get("nested_state", [])):  # the history levels' architectures
            skeleton, _ = read_growth(c.path, model=None if getattr(model, "nni_elastic_arch", None) else copy.deepcopy(model))
            level = NestedLevel(skeleton.to(device), private_bn=self.options.history_bn == "private")
            level.load_state(own)
            st.levels.append(level)
        return model, saved

    def _named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The model's parameters and the history levels' own ones (``history.<i>.<name>``): what the optimizer holds."""
        st = self.state_
        own = [(f"history.{i}.{n}", p) for i, lv in enumerate(st.levels) for n, p in lv.own_parameters().items()]
        return list(st.model.named_parameters()) + own

    def _restore_optimizer(self, model: nn.Module, opt: torch.optim.Optimizer, sched: Any, state: dict) -> None:
        named = dict(self._named_parameters())
        for group, names in zip(opt.param_groups, state["param_order"]):
            group["params"] = [named[n] for n in names]
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
