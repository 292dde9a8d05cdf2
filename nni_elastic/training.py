"""The one training and evaluation loop shared by every strategy.

``train`` runs epochs of SGD/Adam with a cosine schedule and shows a tqdm bar per epoch (silent
with ``quiet=True``). Elastic models train jointly over their levels with
:func:`elastic_step`: the sandwich rule with in-place distillation (Universally Slimmable
Networks, Yu & Huang 2019): the largest level learns from the labels, the others from the
largest level's soft predictions, so every nested width stays accurate.

Example:
    >>> history = train(em, splits.train, splits.val, TrainConfig(epochs=3), step=elastic_step)
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from tqdm.auto import tqdm

from . import distributed as dist
from .device import resolve_device, run_device, to_device
from .options import check_options, option

__all__ = [
    "TrainConfig", "History", "train", "evaluate", "evaluate_levels", "elastic_step", "plain_step",
    "seed_everything", "make_optimizer", "make_scheduler", "distill_step", "IndexedDataset", "predictions",
    "FORWARD_COST",
]

logger = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "constant")

Step = Callable[[nn.Module, torch.Tensor, Any], torch.Tensor]

FORWARD_COST = 1 / 3
"""A forward pass's share of the compute of a training step (forward plus backward, about 3 forwards)."""


@dataclass
class TrainConfig:
    """The training settings, one object for every strategy and the recipe's ``train:`` section.

    Strategies take it whole and derive a phase's settings with ``dataclasses.replace`` (its
    epochs, learning rate, seed). Validated on construction; a recipe's ``train.lr: -1`` and a
    ``TrainConfig(lr=-1)`` fail with the same rule.
    """

    epochs: int = option(5, ge=0)
    lr: float = option(0.05, gt=0)
    batch_size: int = option(64, ge=1)
    optimizer: str = option("sgd", choices=OPTIMIZERS)
    momentum: float = option(0.9, ge=0)
    weight_decay: float = option(5e-4, ge=0)
    schedule: str = option("cosine", choices=SCHEDULES)
    seed: int = option(0, ge=0)

    def __post_init__(self) -> None:
        check_options(self)


@dataclass
class History:
    """Per-epoch records: ``{"epoch", "train_loss", "val_loss", "val_accuracy", "lr"}``."""

    epochs: list[dict[str, float]] = field(default_factory=list)

    @property
    def last(self) -> dict[str, float]:
        return self.epochs[-1] if self.epochs else {}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_optimizer(params: Sequence[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def plain_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on the model's current configuration; calls ``backward`` and returns the loss."""
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return loss.detach()


def distill_step(weight: float, temperature: float, *, targets: Optional[torch.Tensor] = None,
                 teacher: Optional[nn.Module] = None) -> Step:
    """A step that mixes the labels with a teacher's predictions (knowledge distillation, Hinton et al. 2015).

    ``loss = (1 - weight) * CE(student, y) + weight * T^2 * KL(softmax(teacher / T) || softmax(student / T))``.

    The teacher's logits come from ``targets`` (one row per training sample, computed once by
    :func:`predictions`; the batches then carry ``(labels, indices)``, see :class:`IndexedDataset`)
    or from ``teacher`` run on every batch (eval mode, no gradients).
    """
    if (targets is None) == (teacher is None):
        raise ValueError("distill_step needs exactly one of targets= (precomputed logits) and teacher= (a model)")

    def step(model: nn.Module, x: torch.Tensor, y: Any) -> torch.Tensor:
        logits = model(x)
        if targets is not None:
            y, index = y
            target = targets[index.to(targets.device)].to(logits.device)
        else:
            with torch.no_grad():
                target = teacher(x)
        t = temperature
        kd = F.kl_div((logits / t).log_softmax(dim=1), (target / t).softmax(dim=1), reduction="batchmean")
        loss = (1 - weight) * F.cross_entropy(logits, y) + weight * t * t * kd
        loss.backward()
        return loss.detach()

    return step


class IndexedDataset(Dataset):
    """``dataset`` whose samples carry their index: ``(x, (y, i))`` (to look up per-sample targets)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[Any, tuple[Any, int]]:
        x, y = self.dataset[i]
        return x, (y, i)


def _moved_to(model: nn.Module, device: str | torch.device) -> torch.device:
    """Where an evaluation runs: ``auto`` where the model is (not moved: a model split over devices
    stays split), a named device after moving the model there."""
    target = run_device(model, device)
    if str(device) != "auto":
        model.to(target)
    return target


@torch.no_grad()
def predictions(model: nn.Module, data: Dataset, *, batch_size: int = 256,
                device: str | torch.device = "auto") -> torch.Tensor:
    """``model``'s logits (eval mode) for every sample of ``data``, in order, as float32 on the CPU.

    ``device`` as in :func:`evaluate` (``auto``: where the model is).

    A forward pass costs about a third of a training step (:data:`FORWARD_COST`). Every process of
    a multi-process run computes all rows (each samples any index later).
    """
    device = _moved_to(model, device)
    was_training = model.training
    model.eval()
    rows = []
    try:
        for x, _ in DataLoader(data, batch_size=batch_size, shuffle=False):
            rows.append(model(x.to(device)).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(rows)


def elastic_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, levels: Optional[Sequence[int]] = None,
                 extra: Sequence[Any] = ()) -> torch.Tensor:
    """Sandwich-rule step over an ``ElasticModel``'s levels with in-place distillation.

    The largest level is trained on the labels; each other level (all of them by default) is
    trained to match the largest level's detached soft predictions. Gradients accumulate over
    levels before one optimizer step; every level updates its own BatchNorm statistics.
    ``extra``: ad-hoc configurations (``{group: channels}`` dicts or widths, e.g. random points
    between two levels) distilled the same way; they update the ad-hoc BatchNorm row only.
    Returns the largest level's loss.
    """
    order = list(range(model.num_levels)) if levels is None else list(levels)
    largest = max(order)
    with model.use_level(largest):
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        loss.backward()
    soft = logits.detach().softmax(dim=1)
    for i in order:
        if i != largest:
            with model.use_level(i):
                F.kl_div(model(x).log_softmax(dim=1), soft, reduction="batchmean").backward()
    for config in extra:
        with model.use_level(config):
            F.kl_div(model(x).log_softmax(dim=1), soft, reduction="batchmean").backward()
    return loss.detach()


def _loader(data: Dataset | DataLoader, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    if isinstance(data, DataLoader):
        return data
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=generator if shuffle else None)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Cosine decay to zero over ``cfg.epochs`` epochs (stepped per batch), or a constant rate."""
    if cfg.schedule == "cosine":
        steps = max(1, cfg.epochs * max(1, steps_per_epoch))
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset | DataLoader, *, batch_size: int = 256, device: str | torch.device = "auto") -> dict[str, float]:
    """Mean cross-entropy and accuracy of ``model`` (in eval mode) on ``data``.

    ``device="auto"`` runs where the model's parameters are (a checkpoint loaded on the CPU is
    evaluated there on a CUDA machine too); a named device moves the model there first.

    In a multi-process run (:mod:`nni_elastic.distributed`) every process evaluates its share of a
    dataset and the counts are summed, so each gets the metrics of the whole set; call it on every
    process.
    """
    device = _moved_to(model, device)
    was_training = model.training
    model.eval()
    sharded = dist.is_distributed() and not isinstance(data, DataLoader)
    if dist.is_distributed():
        dist.sync_buffers(model)
    if sharded:
        data = Subset(data, dist.shard_indices(len(data)))
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, correct, count
    try:
        for x, y in _loader(data, batch_size, False, 0):
            x, y = x.to(device), y.to(device)
            logits = model(x)
            sums[0] += F.cross_entropy(logits, y, reduction="sum").double()
            sums[1] += (logits.argmax(dim=1) == y).sum()
            sums[2] += y.numel()
    finally:
        model.train(was_training)
    if sharded:
        dist.all_reduce_(sums)
    loss_sum, correct, total = sums.tolist()
    if total == 0:
        raise ValueError("evaluate got an empty dataset")
    return {"loss": loss_sum / total, "accuracy": correct / total}


def evaluate_levels(em: nn.Module, data: Dataset | DataLoader, *, batch_size: int = 256, device: str | torch.device = "auto") -> list[dict[str, float]]:
    """:func:`evaluate` at every level of an ``ElasticModel`` (smallest first)."""
    results = []
    for i in range(em.num_levels):
        with em.use_level(i):
            results.append(evaluate(em, data, batch_size=batch_size, device=device))
    return results


def train(
    model: nn.Module,
    train_data: Dataset | DataLoader,
    val_data: Optional[Dataset | DataLoader] = None,
    cfg: Optional[TrainConfig] = None,
    *,
    step: Step = plain_step,
    params: Optional[Sequence[torch.nn.Parameter]] = None,
    device: str | torch.device = "auto",
    quiet: bool = False,
    desc: str = "train",
    on_epoch_end: Optional[Callable[[int, dict[str, float]], Any]] = None,
    evaluate_fn: Optional[Callable[[nn.Module, Any], dict[str, float]]] = None,
    after_step: Optional[Callable[[torch.optim.Optimizer, int], Any]] = None,
    optimizer: Optional[torch.optim.Optimizer] = None,
    scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None,
    start_epoch: int = 0,
) -> History:
    """Train ``model`` for ``cfg.epochs`` epochs; evaluate on ``val_data`` after each.

    Each epoch shuffles with a generator seeded by ``cfg.seed + epoch``, so a run resumed at an
    epoch boundary sees the same batches as an uninterrupted one.

    Args:
        model: the network (moved to ``device``).
        train_data, val_data: datasets or loaders of ``(x, y)`` batches.
        cfg: hyper-parameters (defaults of :class:`TrainConfig`).
        step: computes the loss of one batch and calls ``backward`` (``plain_step`` or
            ``elastic_step``); returns the loss to display.
        params: the parameters to optimise (default: all that require grad).
        device: ``auto``, ``cpu``, ``cuda``.
        quiet: no progress bar.
        desc: progress bar label.
        on_epoch_end: called with ``(epoch, record)``; may raise to stop.
        evaluate_fn: replaces :func:`evaluate` for validation (e.g. the smallest level too).
        after_step: called with ``(optimizer, global_step)`` after every optimizer step (e.g. to
            restore frozen weights, or to grow the model and update the optimizer in place).
        optimizer, scheduler: use these instead of new ones (e.g. when resuming).
        start_epoch: first epoch to run (earlier ones are taken as done).
    """
    cfg = cfg or TrainConfig()
    device = resolve_device(device)
    model.to(device)
    seed_everything(cfg.seed + start_epoch)
    generator = torch.Generator()
    sampler: Optional[DistributedSampler] = None
    if isinstance(train_data, DataLoader):
        if dist.is_distributed():
            raise ValueError("a multi-process run shards the training set itself: pass the Dataset, not a DataLoader")
        loader = train_data
    elif dist.is_distributed():
        loader, sampler = _sharded_loader(train_data, cfg)
    else:
        loader = DataLoader(train_data, batch_size=cfg.batch_size, shuffle=True, generator=generator)
    params = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    history = History()
    if cfg.epochs == 0 or not params:
        return history
    opt = optimizer if optimizer is not None else make_optimizer(params, cfg)
    sched = scheduler if scheduler is not None else make_scheduler(opt, cfg, len(loader))
    # several processes: the step sees the model through DistributedDataParallel (gradients averaged)
    net: Any = dist.Replicated(model, device) if dist.is_distributed() else model
    check_sync = dist.is_distributed() and dist.check_sync_requested()
    global_step = start_epoch * len(loader)
    for epoch in range(start_epoch, cfg.epochs):
        generator.manual_seed(cfg.seed + epoch)
        if sampler is not None:
            sampler.set_epoch(epoch)
        model.train()
        loss_sum, batches = 0.0, 0
        # disable=None: no bar when stderr is not a terminal (logs of NNI trials and CI stay readable)
        bar = tqdm(loader, desc=f"{desc} {epoch + 1}/{cfg.epochs}", disable=True if quiet or not dist.is_main() else None,
                   leave=False, dynamic_ncols=True, mininterval=0.5)
        for x, y in bar:
            x, y = x.to(device, non_blocking=True), to_device(y, device, non_blocking=True)
            opt.zero_grad(set_to_none=True)
            loss = step(net, x, y)
            opt.step()
            global_step += 1
            if after_step is not None:
                after_step(opt, global_step)
                if net is not model:
                    net.refresh()  # growth added parameters: wrap again (rank 0's new weights everywhere)
            if check_sync:
                dist.check_in_sync(model, f"after step {global_step}")
            sched.step()
            loss_sum += float(loss)
            batches += 1
            bar.set_postfix(loss=f"{loss_sum / batches:.4f}", refresh=False)
        if dist.is_distributed():
            dist.sync_buffers(model)  # each process's BatchNorm statistics saw its shard only
            loss_sum = float(dist.all_reduce_(torch.tensor([loss_sum], dtype=torch.float64, device=device), "mean"))
        record = {"epoch": epoch + 1, "train_loss": loss_sum / max(1, batches), "lr": sched.get_last_lr()[0]}
        if val_data is not None:
            metrics = evaluate_fn(model, val_data) if evaluate_fn else evaluate(model, val_data, device=device)
            record.update({f"val_{k}": v for k, v in metrics.items()})
        history.epochs.append(record)
        logger.info("%s epoch %d: %s", desc, epoch + 1, record)
        if on_epoch_end is not None:
            on_epoch_end(epoch, record)
    return history


def _sharded_loader(data: Dataset, cfg: TrainConfig) -> tuple[DataLoader, DistributedSampler]:
    """This process's shard of ``data``, reshuffled per epoch; ``cfg.batch_size`` is the global batch."""
    n = dist.world_size()
    if cfg.batch_size % n:
        raise ValueError(f"train.batch_size {cfg.batch_size} is the global batch of {n} processes: make it a multiple "
                         f"of {n} (each process takes batch_size / {n})")
    sampler = DistributedSampler(data, num_replicas=n, rank=dist.rank(), shuffle=True, seed=cfg.seed)
    return DataLoader(data, batch_size=cfg.batch_size // n, sampler=sampler), sampler
