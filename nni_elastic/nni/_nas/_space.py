"""Elastic subnets as an NNI 3.0 model space: per-stage (or per-group) widths over shared weights.

:class:`ElasticSpace` is an ``nni.nas.nn.pytorch.ModelSpace`` whose mutables are one
``nni.choice`` of widths per stage (:mod:`nni_elastic.stages`) or per channel group. Freezing a
sample returns an :class:`ElasticSubnet`, a view of the same :class:`~nni_elastic.ElasticModel`
at that level: no weight is copied or trained. In a trial process of NNI's training-service
engine the space is rebuilt from its checkpoint path (``model_context``) and frozen on load.
:class:`ElasticEvaluator` recalibrates BatchNorm, evaluates and reports ``default`` (accuracy,
``-violation`` over budget), MACs, params and measured latency, as ``nni-elastic search`` does.

Example:
    >>> space = ElasticSpace.from_checkpoint("runs/prune_and_grow/digits/elastic.pt")
    >>> exp = NasExperiment(space, ElasticEvaluator(data="digits", max_macs=0.5), RegularizedEvolution())
"""
from __future__ import annotations

import logging
import os
import tempfile
import weakref
from pathlib import Path
from typing import Any, ClassVar, Mapping, Optional, Sequence, Union

import nni
import torch
from nni.common.serializer import SerializableObject
from nni.nas.evaluator import MutableEvaluator
from nni.nas.nn.pytorch import ModelSpace
from torch import nn

from ...elastic import ElasticModel
from ...stages import model_stages, stage_groups, stage_level

__all__ = ["ElasticSpace", "ElasticSubnet", "ElasticEvaluator"]

logger = logging.getLogger(__name__)

Source = Union[str, os.PathLike, ElasticModel]

# Trials of the sequential engine (and several frozen samples of one process) share one loaded model.
_LOADED: dict[tuple[str, float, bool], ElasticModel] = {}


def load_elastic(path: Union[str, os.PathLike], trust: bool = False) -> ElasticModel:
    """Load an ``elastic.pt`` once per process (keyed by path and mtime); one clear error if it is not one."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {str(p)!r} does not exist; train one first, e.g. nni-elastic run "
                                f"strategies/prune_and_grow/digits.yaml (writes runs/prune_and_grow/digits/elastic.pt)")
    key = (str(p.resolve()), p.stat().st_mtime, trust)
    if key not in _LOADED:
        try:
            em = ElasticModel.load(p, trust=trust)
        except (KeyError, TypeError, AttributeError) as e:  # a state dict or other file lacks the elastic fields
            raise ValueError(f"{str(p)!r} is not an elastic model checkpoint ({type(e).__name__}: {e}); pass an "
                             f"elastic.pt written by ElasticModel.save / nni-elastic run") from None
        if not isinstance(em, ElasticModel):
            raise ValueError(f"{str(p)!r} is not an elastic model checkpoint; pass an elastic.pt written by "
                             f"ElasticModel.save / nni-elastic run")
        _LOADED[key] = em.eval()
    return _LOADED[key]


def _keys(em: ElasticModel, stages: Union[Sequence[str], str, None]) -> list[str]:
    if stages is None or stages == "stages":
        keys = model_stages(em)
    elif stages == "groups":
        keys = list(em.graph.names)
    elif isinstance(stages, str):
        raise ValueError(f"stages={stages!r}: use 'stages', 'groups' or a list of stage keys such as {model_stages(em)}")
    else:
        keys = list(stages)
    if not keys:
        raise ValueError("ElasticSpace has no mutable: stages is empty; use the default (the model's stages "
                         f"{model_stages(em)}) or stages='groups'")
    stage_groups(em, keys)  # every key must match a channel group (one clear error otherwise)
    return keys


def _width_values(em: ElasticModel, widths: Optional[Sequence[float]]) -> list[float]:
    values = sorted({float(lv.width) for lv in em.levels if lv.width is not None}) if widths is None else list(widths)
    if len(values) < 2:
        raise ValueError(f"widths={values!r}: an ElasticSpace needs at least two widths to choose from, e.g. "
                         f"widths=(0.25, 0.5, 0.75, 1.0)")
    for w in values:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 < w <= 1:
            raise ValueError(f"widths={values!r}: {w!r} is not a width, a fraction in (0, 1]")
    return sorted(float(w) for w in values)


class ElasticSubnet(nn.Module):
    """One frozen sample of an :class:`ElasticSpace`: the shared elastic model at a per-stage level.

    ``forward`` runs that level (sliced weights); :meth:`export` is ``em.export(level)``.
    """

    def __init__(self, em: ElasticModel, widths: Mapping[str, float]) -> None:
        super().__init__()
        self.em = em
        self.widths = {k: float(v) for k, v in widths.items()}
        self.level = stage_level(em, self.widths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.em.use_level(self.level):
            return self.em(x)

    @property
    def channels(self) -> dict[str, int]:
        return self.em.channels_of(self.level)

    def export(self) -> nn.Module:
        """The compact, physically pruned subnet (plain PyTorch modules)."""
        return self.em.export(self.level)


class ElasticSpace(ModelSpace):
    """NNI model space of an elastic model's per-stage widths, over its shared weights.

    Args:
        source: an ``elastic.pt`` path or a loaded :class:`~nni_elastic.ElasticModel` (saved to a
            temporary checkpoint so that trial processes can rebuild the space).
        widths: the widths every stage chooses from (default: the model's level widths).
        stages: ``"stages"`` (default: the top-level modules, :func:`~nni_elastic.stages.model_stages`),
            ``"groups"`` (one mutable per channel group) or a list of stage keys.
        trust: unpickle a model stored pickled (runs code from the file).

    Mutables are labelled by stage key (``conv1``, ``layer1``, ...); a sample ``{stage: width}`` is
    what ``nni-elastic search`` calls ``widths``: ``em.export(stage_level(em, sample))``.
    """

    em: ElasticModel

    def __init__(self, source: Source, *, widths: Optional[Sequence[float]] = None,
                 stages: Union[Sequence[str], str, None] = None, trust: bool = False) -> None:
        super().__init__()
        if isinstance(source, ElasticModel):
            em = source.eval()
            path = Path(tempfile.mkdtemp(prefix="nni_elastic_space_")) / "elastic.pt"
            em.save(path)  # trial processes rebuild the space from this path (NNI dumps init arguments)
            self.trace_args, self.trace_kwargs = (), {**self.trace_kwargs, "source": str(path)}
            logger.info("ElasticSpace: model saved to %s for NNI trial processes", path)
        elif isinstance(source, (str, os.PathLike)):
            em = load_elastic(source, trust)
        else:
            raise ValueError(f"ElasticSpace source must be an elastic.pt path or an ElasticModel, got "
                             f"{type(source).__name__}")
        self.em = em
        self.keys = _keys(em, stages)
        self.values = _width_values(em, widths)
        for key in self.keys:
            self.add_mutable(nni.choice(key, self.values))

    @classmethod
    def from_checkpoint(cls, path: Union[str, os.PathLike], **kwargs: Any) -> "ElasticSpace":
        """The space of an ``elastic.pt`` (``nni-elastic run`` writes one); keywords as for the class."""
        return cls(str(path), **kwargs)

    @classmethod
    def create_fixed_module(cls, sample: dict, source: Source, *, widths: Optional[Sequence[float]] = None,
                            stages: Union[Sequence[str], str, None] = None, trust: bool = False) -> ElasticSubnet:
        """Inside ``model_context(sample)`` (an NNI trial): the subnet of ``sample`` on the loaded model."""
        em = source if isinstance(source, ElasticModel) else load_elastic(source, trust)
        keys = _keys(em, stages)
        missing = [k for k in keys if k not in sample]
        if missing:
            raise ValueError(f"sample {sample!r} lacks a width for stage(s) {missing}")
        return ElasticSubnet(em, {k: sample[k] for k in keys})

    def freeze(self, sample: dict) -> ElasticSubnet:
        """The subnet of ``sample`` on this space's model (shares its weights; nothing is copied)."""
        self.validate(sample)
        return ElasticSubnet(self.em, {k: sample[k] for k in self.keys})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.em(x)  # a dry run of the active level; search through freeze()

    def export(self, sample: Mapping[str, float]) -> nn.Module:
        """The compact subnet of ``sample`` (e.g. ``exp.export_top_models(formatter="dict")[0]``)."""
        return self.freeze(dict(sample)).export()


# ---------------------------------------------------------------------- evaluator
# One SubnetEvaluator (calibration batches, validation data, caches) per model and settings in a process.
_EVALUATORS: "weakref.WeakKeyDictionary[ElasticModel, dict]" = weakref.WeakKeyDictionary()


class KeywordTraced:
    """NNI serialises an evaluator by its class and keyword arguments (as FunctionalEvaluator does):
    a subclass keeps its constructor keywords in ``self.arguments``."""

    arguments: dict[str, Any]

    @property
    def trace_symbol(self) -> Any:
        return self.__class__

    @property
    def trace_args(self) -> list:
        return []

    @property
    def trace_kwargs(self) -> dict[str, Any]:
        return dict(self.arguments)

    def trace_copy(self) -> SerializableObject:
        return SerializableObject(self.__class__, [], self.trace_kwargs)


class ElasticEvaluator(KeywordTraced, MutableEvaluator):
    """Recalibrate BatchNorm and evaluate an :class:`ElasticSubnet` on shared weights; report to NNI.

    Args:
        data, data_root: dataset (default: the checkpoint's, split as in training).
        max_macs: budget, a fraction of the full MACs if <= 1, else MACs.
        max_latency_ms: budget on the export's latency on this machine.
        latency: measure the export's latency (reported as ``latency_ms``).
        calibrate_batches, seed: BatchNorm recalibration batches and their order.
        val_limit: evaluate on the first ``val_limit`` validation samples only.
        device: ``auto``, ``cpu``, ``cuda``.

    Reported: ``default`` (accuracy within budget, ``-violation`` over it), ``accuracy``,
    ``feasible``, ``violation``, ``macs``, ``macs_ratio``, ``params``, ``params_ratio``, ``latency_ms``
    (:func:`nni_elastic.nni.subnet_metric`).
    """

    _traced: ClassVar[bool] = True

    def __init__(self, data: Optional[str] = None, *, max_macs: Optional[float] = None,
                 max_latency_ms: Optional[float] = None, latency: bool = True, calibrate_batches: int = 10,
                 seed: int = 0, val_limit: Optional[int] = None, device: str = "auto",
                 data_root: Optional[str] = None) -> None:
        from ...subnet import latency_budget

        latency_budget(max_latency_ms)  # bad budgets fail here, not in every trial
        if max_macs is not None and (isinstance(max_macs, bool) or not isinstance(max_macs, (int, float)) or max_macs <= 0):
            raise ValueError(f"max_macs={max_macs!r} must be a positive fraction of the full MACs (<= 1) or MACs")
        self.arguments = dict(data=data, max_macs=max_macs, max_latency_ms=max_latency_ms, latency=latency,
                              calibrate_batches=calibrate_batches, seed=seed, val_limit=val_limit, device=device,
                              data_root=data_root)


    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.arguments.items() if v is not None)

    def _subnet_evaluator(self, em: ElasticModel) -> Any:
        from ...subnet import SubnetEvaluator

        a = self.arguments
        key = tuple(sorted((k, v) for k, v in a.items() if k not in ("max_macs", "max_latency_ms")))
        cache = _EVALUATORS.setdefault(em, {})
        if key not in cache:
            cache[key] = SubnetEvaluator.from_checkpoint(
                em, data=a["data"], data_root=a["data_root"], seed=a["seed"], calibrate_batches=a["calibrate_batches"],
                val_limit=a["val_limit"], device=a["device"], latency=a["latency"] or a["max_latency_ms"] is not None)
        return cache[key]

    def evaluate(self, model: ElasticSubnet) -> dict[str, float]:
        """Evaluate one subnet, report its metric dict to NNI and return it."""
        from ...subnet import evaluate_subnet, latency_budget, macs_budget
        from ..subnet_trial import subnet_metric

        if not isinstance(model, ElasticSubnet):
            raise TypeError(f"ElasticEvaluator evaluates ElasticSpace samples, got {type(model).__name__}; use it "
                            f"with an ElasticSpace")
        ev = self._subnet_evaluator(model.em)
        full = ev.full_cost()
        row = evaluate_subnet(ev, model.widths, macs_cap=macs_budget(self.arguments["max_macs"], full["macs"], "max_macs"),
                              latency_cap=latency_budget(self.arguments["max_latency_ms"]), full=full)
        metric = subnet_metric(row)  # numbers only: an unmeasured latency is left out
        logger.info("subnet %s: %s", model.widths, metric)
        nni.report_final_result(metric)
        return metric
