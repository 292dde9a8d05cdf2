"""Expansion-score growth as an NNI 3.0 NAS strategy, over a space of ordered sizes.

:class:`GrowableSpace` is ``growable_cnn`` as an NNI model space: one ordered ``nni.choice`` of
channels and one of extra blocks per stage. :class:`ExpansionGrowthStrategy` walks it as
:class:`nni_elastic.strategies.ExpansionGrowth` grows a network (SECNN / SENN, see that module):
it starts at the smallest architecture and submits it to NNI's engine, where
:class:`GrowthEvaluator` trains it ``check_every`` optimizer steps, checkpoints it and reports
accuracy, params and MACs. The strategy then scores every one-step-larger neighbour with the
natural expansion score eta of a function-preserving expansion of the trained weights (more
channels: zero outgoing weights; one more block: identity-initialised), moves to the best
neighbour when its gain ``eta_c - eta`` passes ``threshold``, and the next trial continues
training from the expanded weights. It stops when no gain passes, at the largest architecture,
or when the experiment's trial budget is spent.

Example:
    >>> exp = NasExperiment(GrowableSpace(), GrowthEvaluator(data="digits"),
    ...                     ExpansionGrowthStrategy(threshold=0.03, damping=1.0, check_every=50))
"""
from __future__ import annotations

import copy
import inspect
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional, Sequence, Union

import nni
import torch
from nni.mutable import Categorical
from nni.nas.evaluator import MutableEvaluator
from nni.nas.space import ModelStatus
from nni.nas.nn.pytorch import ModelSpace
from nni.nas.strategy import Strategy
from torch import nn

from ._space import KeywordTraced

__all__ = ["GrowableSpace", "GrowthEvaluator", "ExpansionGrowthStrategy", "GrowthStep"]

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------- space
def _ordered(name: str, values: Sequence[int], minimum: int) -> list[int]:
    values = list(values)
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < minimum for v in values) \
            or any(a >= b for a, b in zip(values, values[1:])):
        raise ValueError(f"{name}={values!r}: give strictly increasing integers >= {minimum} (the sizes a stage "
                         f"grows through), e.g. [4, 8, 16]")
    return values


class GrowableSpace(ModelSpace):
    """``growable_cnn`` as an NNI model space: ordered channels and extra blocks per stage.

    Args:
        channels: per stage, the channel counts it can have (strictly increasing).
        blocks: per stage, the extra block counts it can have (strictly increasing, from 0).
        num_classes, in_channels: as for ``create_model("growable_cnn", ...)``.

    Labels: ``channels0``, ``blocks0``, ``channels1``, ... A frozen sample is a plain ``GrowableCNN``.
    """

    def __init__(self, channels: Sequence[Sequence[int]] = ((4, 8, 16), (8, 16, 32), (8, 16, 32)),
                 blocks: Sequence[Sequence[int]] = ((0, 1), (0, 1), (0, 1)), *, num_classes: int = 10,
                 in_channels: int = 1) -> None:
        super().__init__()
        self.spec = self._spec(channels, blocks)
        for label, values in self.spec.items():
            self.add_mutable(nni.choice(label, values))
        self.num_classes, self.in_channels = num_classes, in_channels
        self.net = self._build({k: v[-1] for k, v in self.spec.items()}, num_classes, in_channels)

    @staticmethod
    def _spec(channels: Sequence[Sequence[int]], blocks: Sequence[Sequence[int]]) -> dict[str, list[int]]:
        if len(channels) != len(blocks) or not channels:
            raise ValueError(f"channels and blocks need one list per stage, same number of stages; got "
                             f"{len(channels)} and {len(blocks)}")
        spec: dict[str, list[int]] = {}
        for i, (c, b) in enumerate(zip(channels, blocks)):
            spec[f"channels{i}"] = _ordered(f"channels[{i}]", c, 1)
            spec[f"blocks{i}"] = _ordered(f"blocks[{i}]", b, 0)
        return spec

    @staticmethod
    def _build(sample: dict, num_classes: int, in_channels: int) -> nn.Module:
        from ...models import create_model

        n = sum(1 for k in sample if k.startswith("channels"))
        # the same initial weights in a trial process and in this one (NNI's engines differ in RNG state)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return create_model("growable_cnn", num_classes=num_classes, in_channels=in_channels,
                                channels=[int(sample[f"channels{i}"]) for i in range(n)],
                                blocks=[int(sample[f"blocks{i}"]) for i in range(n)])

    @classmethod
    def build(cls, sample: dict, *args: Any, **kwargs: Any) -> nn.Module:
        """The fresh ``GrowableCNN`` of ``sample`` for a space built with ``(*args, **kwargs)``."""
        bound = inspect.signature(cls._init_wrapped).bind(None, *args, **kwargs)
        bound.apply_defaults()
        return cls._build(sample, bound.arguments["num_classes"], bound.arguments["in_channels"])

    @classmethod
    def create_fixed_module(cls, sample: dict, *args: Any, **kwargs: Any) -> nn.Module:
        return cls.build(sample, *args, **kwargs)

    def freeze(self, sample: dict) -> nn.Module:
        self.validate(sample)
        return self._build(sample, self.num_classes, self.in_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # a dry run of the largest architecture

    @staticmethod
    def expand(model: nn.Module, label: str, old: int, new: int, calibration: torch.Tensor,
               example: torch.Tensor) -> None:
        """Grow ``model`` in place from ``label = old`` to ``new``, keeping its function (eval mode).

        ``channelsI``: every channel group of stage I gains ``new - old`` channels (zero outgoing
        weights); ``blocksI``: ``new - old`` identity-initialised blocks whose BatchNorm takes its
        statistics from ``calibration`` (:func:`nni_elastic.expansion.ops.add_block`).
        """
        from ...expansion.ops import add_block, widen_group
        from ...graph import build_channel_graph

        kind, stage = label.rstrip("0123456789"), int(label[len(label.rstrip("0123456789")):])
        if kind == "blocks":
            for _ in range(new - old):
                add_block(model, stage, calibration=calibration)
        elif kind == "channels":
            prefix = f"stages.{stage}."
            for name in [g for g in build_channel_graph(model, example).names if g.startswith(prefix)]:
                widen_group(model, build_channel_graph(model, example).group(name), new - old)
        else:
            raise ValueError(f"GrowableSpace has no mutable {label!r}")


# ---------------------------------------------------------------------- evaluator
class GrowthEvaluator(KeywordTraced, MutableEvaluator):
    """Train a frozen sample ``steps`` optimizer steps (from ``init_from`` when given), evaluate, report.

    Args:
        data, data_root: dataset (:func:`nni_elastic.data.load_dataset`).
        lr, batch_size, seed, device: training settings (SGD, constant learning rate).
        steps, init_from, checkpoint, offset: set per trial by :class:`ExpansionGrowthStrategy`:
            optimizer steps, weights to start from, where to save the trained weights, and the
            batch offset into the (seeded) training order so consecutive trials see new batches.

    Reported: ``default`` = ``accuracy`` (validation), ``params``, ``macs``.
    """

    _traced: ClassVar[bool] = True

    def __init__(self, data: str = "digits", *, lr: float = 0.05, batch_size: int = 64, seed: int = 0,
                 steps: int = 100, init_from: Optional[str] = None, checkpoint: Optional[str] = None, offset: int = 0,
                 device: str = "cpu", data_root: Optional[str] = None) -> None:
        self.arguments = dict(data=data, lr=lr, batch_size=batch_size, seed=seed, steps=steps, init_from=init_from,
                              checkpoint=checkpoint, offset=offset, device=device, data_root=data_root)

    def replace(self, **changes: Any) -> "GrowthEvaluator":
        return self.__class__(**{**self.arguments, **changes})

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        from ...data import load_dataset
        from ...measure import count_ops
        from ...training import TrainConfig, evaluate, train

        a = self.arguments
        splits = load_dataset(a["data"], root=a["data_root"])
        if a["init_from"]:
            model.load_state_dict(torch.load(a["init_from"], map_location="cpu", weights_only=True))
        # exactly `steps` batches of the seeded training order, continuing where the previous trial stopped
        order = torch.randperm(len(splits.train), generator=torch.Generator().manual_seed(a["seed"]))
        n = a["steps"] * a["batch_size"]
        idx = order[(torch.arange(n) + a["offset"] * a["batch_size"]) % len(order)].tolist()
        cfg = TrainConfig(epochs=1, lr=a["lr"], batch_size=a["batch_size"], schedule="constant", seed=a["seed"])
        train(model, torch.utils.data.Subset(splits.train, idx), None, cfg, device=a["device"], quiet=True)
        model = model.cpu().eval()
        accuracy = evaluate(model, splits.val, device="cpu")["accuracy"]
        example = splits.train[0][0].unsqueeze(0)
        macs, params = count_ops(model, example)
        metric = {"default": float(accuracy), "accuracy": float(accuracy), "params": int(params), "macs": int(macs)}
        if a["checkpoint"]:
            path = Path(a["checkpoint"])
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save(model.state_dict(), tmp)
            os.replace(tmp, path)
            path.with_suffix(".json").write_text(json.dumps(metric))  # the strategy reads params and MACs here
        logger.info("growth trial: %s", metric)
        nni.report_final_result(metric)
        return metric


# ---------------------------------------------------------------------- strategy
@dataclass
class GrowthStep:
    """One visited architecture: its sample, trial metric, checkpoint, and the neighbour scores after it."""

    sample: dict[str, Any]
    metric: dict[str, float]
    checkpoint: str
    eta: Optional[float] = None
    gains: dict[str, float] = field(default_factory=dict)
    best: Optional[str] = None
    grew: bool = False


def _space_class(space: Any) -> tuple[type, tuple, dict]:
    """The ModelSpace class and its init arguments behind an executable model space (simplified or raw)."""
    model = getattr(space, "model", None) or getattr(space, "model_space", None)
    if model is None or not hasattr(model, "trace_symbol"):
        raise ValueError(f"ExpansionGrowthStrategy cannot read the model space of {type(space).__name__}; use the "
                         f"'simplified' or 'raw' model format")
    return model.trace_symbol, tuple(model.trace_args), dict(model.trace_kwargs)


class ExpansionGrowthStrategy(Strategy):
    """NNI NAS strategy: grow from the smallest architecture by the natural expansion score.

    Args:
        threshold: minimum gain ``eta_neighbour - eta`` to move to the best neighbour (>= 0).
        damping: the absolute Fisher damping lambda of eta (> 0).
        check_every: optimizer steps each visited architecture trains before its neighbours are scored.
        score_batch: samples N of the score (an N x N Gram matrix).
        checkpoint_dir: where trained weights go (``arch{i}.pt``) and the expanded starts (``init{i}.pt``);
            default: a new temporary directory (logged).
        seed: order of the score batches.

    The space's mutables must be ordered sizes (categorical choices of increasing numbers) and
    its class must know function-preserving expansions (``expand``, as :class:`GrowableSpace`);
    the evaluator must be a :class:`GrowthEvaluator`. After ``run``, :attr:`history` holds every
    :class:`GrowthStep`.
    """

    def __init__(self, threshold: float = 0.03, *, damping: float = 1.0, check_every: int = 100, score_batch: int = 64,
                 checkpoint_dir: Union[str, os.PathLike, None] = None, seed: int = 0) -> None:
        super().__init__()
        for name, value, ok in (("threshold", threshold, lambda v: v >= 0), ("damping", damping, lambda v: v > 0),
                                ("check_every", check_every, lambda v: isinstance(v, int) and v >= 1),
                                ("score_batch", score_batch, lambda v: isinstance(v, int) and v >= 2)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
                raise ValueError(f"ExpansionGrowthStrategy {name}={value!r} is out of range (threshold >= 0, "
                                 f"damping > 0, check_every >= 1 steps, score_batch >= 2)")
        self.threshold, self.damping, self.check_every, self.score_batch = float(threshold), float(damping), check_every, score_batch
        self.checkpoint_dir = checkpoint_dir
        self.seed = seed
        self.history: list[GrowthStep] = []
        self.stop_reason: Optional[str] = None

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}, damping={self.damping}, check_every={self.check_every}"

    def _initialize(self, model_space: Any, engine: Any) -> Any:
        self._order = self._ordered_mutables(model_space)
        cls, _, _ = _space_class(model_space)
        if not callable(getattr(cls, "expand", None)) or not callable(getattr(cls, "build", None)):
            raise ValueError(f"{cls.__name__} has no function-preserving expansions (classmethods build and expand); "
                             f"ExpansionGrowthStrategy needs a space such as nni_elastic.nni.nas.GrowableSpace")
        if not isinstance(model_space.evaluator, GrowthEvaluator):
            raise ValueError(f"ExpansionGrowthStrategy trains through a GrowthEvaluator, got "
                             f"{type(model_space.evaluator).__name__}; pass GrowthEvaluator(data=...)")
        return model_space

    @staticmethod
    def _ordered_mutables(model_space: Any) -> dict[str, list]:
        mutables = model_space.simplify()
        if not mutables:
            raise ValueError("the model space has no mutable: ExpansionGrowthStrategy grows along ordered sizes, "
                             "e.g. nni.choice('channels0', [4, 8, 16])")
        order = {}
        for label, m in mutables.items():
            values = list(getattr(m, "values", []))
            if not isinstance(m, Categorical) or not values or \
                    any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values) or \
                    any(a >= b for a, b in zip(values, values[1:])):
                raise ValueError(f"mutable {label!r} ({m!r}) is not an ordered size: ExpansionGrowthStrategy needs "
                                 f"choices of strictly increasing numbers, e.g. nni.choice({label!r}, [4, 8, 16])")
            order[label] = values
        return order

    def _score_batches(self, evaluator: GrowthEvaluator) -> Any:
        from ...data import load_dataset

        data = load_dataset(evaluator.arguments["data"], root=evaluator.arguments["data_root"]).train
        generator = torch.Generator().manual_seed(self.seed)
        while True:
            for x, y in torch.utils.data.DataLoader(data, batch_size=self.score_batch, shuffle=True, generator=generator):
                if len(x) == self.score_batch:
                    yield x, y

    def _run(self) -> None:
        from ...expansion.score import FisherGram

        space = self.model_space
        cls, args, kwargs = _space_class(space)
        evaluator: GrowthEvaluator = space.evaluator
        out = Path(self.checkpoint_dir) if self.checkpoint_dir is not None else Path(tempfile.mkdtemp(prefix="nni_elastic_growth_"))
        out.mkdir(parents=True, exist_ok=True)
        logger.info("ExpansionGrowthStrategy: checkpoints in %s", out)
        batches = self._score_batches(evaluator)
        index = {label: 0 for label in self._order}
        init: Optional[str] = None
        while True:
            sample = {label: values[index[label]] for label, values in self._order.items()}
            i = len(self.history)
            ckpt = out / f"arch{i}.pt"
            model = space.freeze(sample)
            model.evaluator = evaluator.replace(steps=self.check_every, init_from=init, checkpoint=str(ckpt),
                                                offset=i * self.check_every)
            if not self.wait_for_resource():
                self.stop_reason = "budget"
                break
            self.engine.submit_models(model)
            self.engine.wait_models(model)
            if model.status != ModelStatus.Trained or not ckpt.with_suffix(".json").is_file():
                self.stop_reason = "trial failed"
                logger.error("ExpansionGrowthStrategy: the trial of %s failed (%s); stopping", sample, model.status)
                break
            # NNI keeps only the default value of a metric dict: the evaluator wrote the whole dict beside the weights
            step = GrowthStep(dict(sample), json.loads(ckpt.with_suffix(".json").read_text()), str(ckpt))
            self.history.append(step)

            trained = cls.build(sample, *args, **kwargs)
            trained.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True))
            trained.eval()
            x, y = next(batches)
            step.eta = FisherGram.of(trained, x, y).score(self.damping)
            grown: dict[str, nn.Module] = {}
            for label, values in self._order.items():
                if index[label] + 1 < len(values):
                    cand = copy.deepcopy(trained)
                    cls.expand(cand, label, values[index[label]], values[index[label] + 1], x, x[:1])
                    step.gains[label] = FisherGram.of(cand, x, y).score(self.damping) - step.eta
                    grown[label] = cand
            if not step.gains:
                self.stop_reason = "largest"
                break
            step.best = max(step.gains, key=step.gains.get)
            logger.info("ExpansionGrowthStrategy: %s eta=%.4f gains=%s", sample, step.eta, step.gains)
            if step.gains[step.best] <= self.threshold:
                self.stop_reason = "threshold"
                break
            step.grew = True
            index[step.best] += 1
            init = str(out / f"init{i + 1}.pt")
            torch.save(grown[step.best].state_dict(), init)
        (out / "history.json").write_text(json.dumps(
            {"stop_reason": self.stop_reason, "steps": [vars(s) for s in self.history]}, indent=1, default=str))

    def state_dict(self) -> dict:
        return {"history": [vars(s) for s in self.history], "stop_reason": self.stop_reason}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = [GrowthStep(**s) for s in state_dict.get("history", [])]
        self.stop_reason = state_dict.get("stop_reason")
