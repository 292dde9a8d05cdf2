"""What both strategies share: a plan of named steps, a checkpoint after each, resume, report.

A strategy's ``fit`` runs its steps in order. After every step the whole state (elastic model and
strategy records) is written atomically to ``checkpoint_dir/elastic.pt``; ``fit(..., resume=True)``
reloads it and skips the finished steps. Every step seeds its own RNGs from ``seed`` and its
index, so a resumed run computes exactly what an uninterrupted one does.
"""
from __future__ import annotations

import abc
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from ..training import TrainConfig, evaluate

__all__ = ["Strategy", "Step", "StepInfo", "ParameterGuard", "first_batches", "example_from", "num_samples"]

logger = logging.getLogger(__name__)


@dataclass
class Step:
    """One unit of work that is checkpointed as a whole."""

    name: str
    kind: str
    arg: Any = None


@dataclass
class StepInfo:
    """Passed to ``on_step_end``: the finished step and the validation accuracy of the level it trained."""

    name: str
    index: int
    total: int
    val_accuracy: Optional[float] = None
    extra: dict = field(default_factory=dict)


class ParameterGuard:
    """Keeps the entries outside ``trainable`` masks exactly as they are (call after each optimizer step).

    Masking gradients is not enough: weight decay and momentum would still move "frozen" entries.
    The guard restores them from a snapshot instead, so frozen weights stay bit-identical.
    """

    def __init__(self, model: nn.Module, trainable: dict[str, torch.Tensor]) -> None:
        self.items = []
        self.params = []
        for name, p in model.named_parameters():
            mask = trainable.get(name)
            if mask is None or mask.all():
                if mask is not None:
                    self.params.append(p)
                continue
            if mask.any():
                self.params.append(p)
            self.items.append((p, mask, p.detach().clone()))

    @torch.no_grad()
    def __call__(self, *_: Any) -> None:
        for p, mask, saved in self.items:
            p.copy_(torch.where(mask, p, saved))


def first_batches(data: Dataset | DataLoader, batch_size: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``count`` batches of ``data`` in order (for importance and BN calibration)."""
    loader = data if isinstance(data, DataLoader) else DataLoader(data, batch_size=batch_size, shuffle=False)
    out = []
    for i, (x, y) in enumerate(loader):
        if i >= count:
            break
        out.append((x, y))
    return out


def num_samples(data: Dataset | DataLoader) -> int:
    """Samples in a dataset or in a loader's dataset."""
    return len(data.dataset) if isinstance(data, DataLoader) else len(data)


def example_from(data: Dataset | DataLoader) -> torch.Tensor:
    """A batch of one input from a dataset or loader, for tracing."""
    if isinstance(data, DataLoader):
        x, _ = next(iter(data))
        return x[:1].clone()
    x, _ = data[0]
    return torch.as_tensor(x).unsqueeze(0).clone()


class Strategy(abc.ABC):
    """Base class: ``fit(model, train_data, val_data) -> ElasticModel`` with checkpoints and a report."""

    name = "strategy"

    def __init__(self, *, checkpoint_dir: Optional[str | Path] = None, quiet: bool = False,
                 on_step_end: Optional[Callable[[StepInfo], Any]] = None) -> None:
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.quiet = quiet
        self.on_step_end = on_step_end
        self.report_: list[dict[str, Any]] = []
        self.completed_: list[str] = []
        self.records_: dict[str, Any] = {}
        self.elastic_model_: Any = None

    @abc.abstractmethod
    def fit(self, model: nn.Module, train_data: Dataset | DataLoader, val_data: Dataset | DataLoader, *, resume: bool = False) -> Any:
        """Run the strategy; return its elastic model (or result)."""

    def report(self) -> list[dict[str, Any]]:
        """One row per level: level, width, MACs, params, accuracy, latency (after ``fit``)."""
        if not self.report_:
            raise RuntimeError(f"{type(self).__name__}.report() is available after fit()")
        return [dict(r) for r in self.report_]

    def _checkpoint_path(self, name: str = "elastic.pt") -> Optional[Path]:
        return self.checkpoint_dir / name if self.checkpoint_dir is not None else None

    def _notify(self, info: StepInfo) -> None:
        logger.info("step %d/%d %s done: %s", info.index + 1, info.total, info.name, info.val_accuracy)
        if self.on_step_end is not None:
            self.on_step_end(info)

    def _check_config(self, stored: Optional[dict[str, Any]], path: Any) -> None:
        """Resume only with the settings the checkpoint was written with: anything else mixes two runs."""
        now = self.config()
        if stored is None or stored == now:
            return
        keys = sorted(k for k in set(stored) | set(now) if stored.get(k) != now.get(k))
        changes = ", ".join(f"{k}: {stored.get(k)!r} -> {now.get(k)!r}" for k in keys)
        raise ValueError(f"resume: {path} was written with other settings ({changes}); resume with the same "
                         f"settings or start a new run in another checkpoint_dir")

    def _state(self) -> dict[str, Any]:
        return {"strategy": self.name, "completed": list(self.completed_), "records": self.records_}

    def _restore_state(self, state: dict[str, Any]) -> None:
        if state.get("strategy") != self.name:
            raise ValueError(f"checkpoint was written by strategy {state.get('strategy')!r}, not {self.name!r}")
        self.completed_ = list(state["completed"])
        self.records_ = dict(state["records"])


def accuracy_of(model: nn.Module, data: Any, device: torch.device) -> float:
    return evaluate(model, data, device=device)["accuracy"]


def train_config(epochs: int, lr: float, batch_size: int, optimizer: str, momentum: float, weight_decay: float, seed: int) -> TrainConfig:
    return TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, optimizer=optimizer, momentum=momentum,
                       weight_decay=weight_decay, seed=seed)
