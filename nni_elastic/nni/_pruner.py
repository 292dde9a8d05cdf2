"""``PruneAndGrowPruner``: prune-and-grow behind NNI 3.0's compression ``Pruner`` contract.

NNI users write ``pruner = XPruner(model, config_list, evaluator); model, masks = pruner.compress()``
and hand the masks to a speedup tool. This adapter keeps that contract: ``config_list`` is NNI's own
format, validated by NNI's schema and resolved by NNI's wrappers; ``compress()`` returns the bound
(wrapped) model and masks in NNI's ``{module: {target: mask}}`` format, with the keys, shapes and
dtypes NNI's ``L1NormPruner`` produces for the same ``config_list``. Behind it runs
:class:`~nni_elastic.strategies.PruneAndGrow`, so the result is also an
:class:`~nni_elastic.ElasticModel` with every level usable (``pruner.elastic_model``).

How ``config_list`` translates:

* each entry's ``sparse_ratio`` ``r`` becomes a uniform level of width ``1 - r``; the levels are
  ``sorted({1 - r} | {1.0})`` (plus any ``widths=`` given to the strategy). Levels are uniform: at a
  level every elastic channel group keeps the same fraction, so with several ratios the masks of
  one level apply one width to every targeted module (choose the level with ``level=``);
* Conv/Linear modules that no entry targets (not matched by ``op_types``/``op_names``/
  ``op_names_re``, or removed by ``exclude_op_*``), or whose ratio is 0, become ``ignored_layers``:
  their output channels, and every channel coupled to them, never shrink;
* settings that make no sense for nested uniform levels (``sparse_threshold``,
  ``global_group_id``, granularities other than output channels, input/output targets) are
  rejected with a ``ValueError``; ``dependency_group_id`` is accepted and needs nothing: coupled
  channels (residual sums) always share one mask here.

Masks and the masked forward: like ``L1NormPruner``, the masks cover the targeted modules only.
With ``op_types: ["Conv2d"]`` a dropped channel still gets its BatchNorm shift, so the masked
(wrapped) forward is close to, not equal to, the level; a speedup removes those channels and gives
the level exactly. Add ``"BatchNorm2d"`` to ``op_types`` to make the masked forward exact too.

Evaluators: prune-and-grow switches levels, trains only the channels a level adds (restoring the
others after each optimizer step) and trains several levels per batch (sandwich rule). NNI's
``training_func`` is the user's whole opaque loop (its own data, epochs and loss), so it cannot drive
these steps; training therefore needs ``train_data`` and ``val_data``. The evaluator is used for what
fits: its ``evaluating_func`` (``evaluator.evaluate()`` on a bound model) scores every level's
compact export after ``compress()`` (``pruner.level_scores``), and a tensor ``dummy_input`` traces
the model.

Example:
    >>> pruner = PruneAndGrowPruner(model, [{"op_types": ["Conv2d"], "sparse_ratio": 0.5}],
    ...                             train_data=splits.train, val_data=splits.val, finetune_epochs=1)
    >>> model, masks = pruner.compress()
    >>> pruner.unwrap_model()
    >>> compact = speedup_with_masks(model, masks, splits.example_inputs())
"""
from __future__ import annotations

import copy
import logging
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
from nni.compression.base.compressor import Pruner
from nni.compression.base.target_space import PruningTargetSpace, TargetType
from nni.compression.utils import Evaluator

from ..elastic import ElasticModel, check_widths
from ..graph import keep_indices
from ..strategies import PruneAndGrow
from ._speedup import drop_restored_forward

__all__ = ["PruneAndGrowPruner"]

logger = logging.getLogger(__name__)

Masks = Dict[str, Dict[str, Optional[torch.Tensor]]]

#: modules whose output channels root a channel group (what ``ignored_layers`` must name)
_PRODUCERS = (nn.modules.conv._ConvNd, nn.Linear)
#: pruning settings a nested uniform level cannot honour
_UNSUPPORTED_SETTINGS = ("sparse_threshold", "global_group_id")
_CHANNEL_GRANULARITIES = ("default", "out_channel", None)


class PruneAndGrowPruner(Pruner):
    """NNI ``Pruner`` that runs prune-and-grow and returns NNI masks for one of the nested levels.

    Args:
        model: the model to compress (NNI wraps it, as every NNI pruner does).
        config_list: NNI's config list, e.g. ``[{"op_types": ["Conv2d"], "sparse_ratio": 0.5}]``;
            validated by NNI's schema (``schema.SchemaError`` on malformed entries).
        evaluator: optional NNI ``Evaluator``; its ``evaluate()`` scores every level after
            ``compress()`` and a tensor ``dummy_input`` is used for tracing. Its training loop is
            not used (see the module docstring).
        train_data, val_data: datasets or ``DataLoader``s of ``(x, y)``; required.
        strategy: a configured :class:`PruneAndGrow`; its widths must include the widths the
            config implies, and its ``ignored_layers`` are extended by the modules the config
            leaves out. Without it one is built from ``strategy_kwargs``.
        level: index of the level the NNI masks describe (default: the level of the config's
            largest ``sparse_ratio``, i.e. the smallest level the config implies).
        **strategy_kwargs: passed to :class:`PruneAndGrow` (``pretrain_epochs``,
            ``finetune_epochs``, ``grow_epochs``, ``quiet``, ...); ``widths`` adds levels and
            ``ignored_layers`` adds module paths.

    Attributes (after ``compress()``):
        elastic_model: the :class:`ElasticModel` holding every level.
        level: the index the masks describe.
        level_scores: ``evaluator.evaluate()`` of each level's export (``None`` without evaluator).

    Example:
        >>> pruner = PruneAndGrowPruner(model, [{"op_types": ["Conv2d"], "sparse_ratio": 0.5}],
        ...                             train_data=train, val_data=val, pretrain_epochs=2)
        >>> model, masks = pruner.compress()
        >>> pruner.elastic_model.set_level(-1)   # every level stays usable
    """

    def __init__(
        self,
        model: nn.Module,
        config_list: List[Dict[str, Any]],
        evaluator: Optional[Evaluator] = None,
        *,
        train_data: Any = None,
        val_data: Any = None,
        strategy: Optional[PruneAndGrow] = None,
        level: Optional[int] = None,
        **strategy_kwargs: Any,
    ) -> None:
        missing = [name for name, value in (("train_data", train_data), ("val_data", val_data)) if value is None]
        if missing:
            raise ValueError(
                f"PruneAndGrowPruner needs train_data and val_data (missing: {', '.join(missing)}): "
                "prune-and-grow trains level by level with its own loop, which an NNI evaluator's "
                "training_func cannot drive; pass datasets or DataLoaders of (x, y)"
            )
        if strategy is not None and not isinstance(strategy, PruneAndGrow):
            raise ValueError(f"strategy must be a PruneAndGrow instance, got {type(strategy).__name__}")
        if strategy is not None and strategy_kwargs:
            raise ValueError(
                f"give either strategy= or strategy keyword arguments, not both (got {sorted(strategy_kwargs)})"
            )
        if level is not None and (isinstance(level, bool) or not isinstance(level, int)):
            raise ValueError(f"level={level!r} must be a level index (int), e.g. 0 for the smallest level")
        super().__init__(model, config_list, evaluator)  # NNI validates config_list and wraps the model
        try:
            ratios, ignored = self._read_target_spaces()
            self.strategy = self._make_strategy(strategy, strategy_kwargs, ratios, ignored)
            widths = self.strategy.widths
            self.level = self._resolve_level(level, widths, 1.0 - max(ratios))
        except Exception:
            self.unwrap_model()  # leave the user's model as it was
            raise
        self.train_data, self.val_data = train_data, val_data
        self.elastic_model: Optional[ElasticModel] = None
        self.level_scores: Optional[List[Any]] = None

    # ------------------------------------------------------------------ config translation
    def _read_target_spaces(self) -> tuple[list[float], list[str]]:
        """Sparse ratios of the targeted modules and the producers the config leaves out."""
        ratios: list[float] = []
        kept: set[str] = set()
        for module_name, spaces in self._target_spaces.items():
            for target_name, space in spaces.items():
                self._check_space(module_name, target_name, space)
            weight = spaces.get("weight")
            if weight is None:
                continue
            ratio = weight.sparse_ratio
            if ratio is None:
                raise ValueError(
                    f"config_list gives module {module_name!r} no sparse_ratio; every entry that targets "
                    "weights needs one, e.g. {'op_types': ['Conv2d'], 'sparse_ratio': 0.5}"
                )
            if not 0.0 <= ratio < 1.0:
                raise ValueError(f"sparse_ratio={ratio!r} of module {module_name!r} is outside [0, 1)")
            if ratio > 0.0:
                kept.add(module_name)
                ratios.append(float(ratio))
        if not ratios:
            raise ValueError(
                "config_list targets no module with a positive sparse_ratio; nothing can be pruned "
                "(check op_types/op_names against model.named_modules())"
            )
        ignored = [
            name for name, module in self.bound_model.named_modules()
            if isinstance(module, _PRODUCERS) and name not in kept
        ]
        return ratios, ignored

    @staticmethod
    def _check_space(module_name: str, target_name: str, space: PruningTargetSpace) -> None:
        where = f"config_list entry for {module_name!r} (target {target_name!r})"
        if space.type is not TargetType.PARAMETER:
            raise ValueError(f"{where}: prune-and-grow masks parameters only; remove input/output targets")
        for key in _UNSUPPORTED_SETTINGS:
            if space.setting.get(key) is not None:
                raise ValueError(f"{where}: {key}={space.setting[key]!r} is not supported; nested levels use sparse_ratio")
        if space.granularity not in _CHANNEL_GRANULARITIES:
            raise ValueError(
                f"{where}: granularity={space.granularity!r} is not supported; prune-and-grow removes whole "
                "output channels (granularity 'default' or 'out_channel')"
            )

    def _make_strategy(
        self, strategy: Optional[PruneAndGrow], kwargs: Dict[str, Any], ratios: Sequence[float], ignored: List[str]
    ) -> PruneAndGrow:
        derived = {round(1.0 - r, 9) for r in ratios} | {1.0}
        if strategy is not None:
            have = {round(w, 9) for w in strategy.widths}
            if not derived <= have:
                raise ValueError(
                    f"strategy widths {list(strategy.widths)} lack the widths {sorted(derived - have)} that "
                    f"config_list's sparse_ratio values imply ({sorted(derived)})"
                )
            strategy.ignored_layers = list(dict.fromkeys([*strategy.ignored_layers, *ignored]))
            return strategy
        kwargs = dict(kwargs)
        extra = kwargs.pop("widths", None)
        if extra:
            derived |= {round(w, 9) for w in check_widths(sorted(extra))}
        extra_ignored = list(kwargs.pop("ignored_layers", ()))
        return PruneAndGrow(widths=sorted(derived), ignored_layers=list(dict.fromkeys([*extra_ignored, *ignored])), **kwargs)

    @staticmethod
    def _resolve_level(level: Optional[int], widths: Sequence[float], config_width: float) -> int:
        n = len(widths)
        if level is None:
            return min(range(n), key=lambda i: abs(widths[i] - config_width))
        if not -n <= level < n:
            raise ValueError(f"level={level} does not exist; the config and strategy give levels 0..{n - 1} (widths {list(widths)})")
        return level % n

    # ------------------------------------------------------------------ compress
    def compress(self, max_steps: Optional[int] = None, max_epochs: Optional[int] = None):  # type: ignore[override]
        """Run prune-and-grow; return ``(model, masks)`` like every NNI pruner.

        ``model`` is the bound (still wrapped) model, now holding the trained full-width weights and
        the chosen level's BatchNorm statistics; ``masks`` zero the output channels that level drops.
        Call ``pruner.unwrap_model()`` before a speedup tool, as with NNI's own pruners: then
        :func:`~nni_elastic.nni.speedup_with_masks`, or NNI's ``ModelSpeedup`` with the workaround
        documented there, gives a compact model equal to ``pruner.elastic_model.export(level)``.
        """
        return super().compress(max_steps, max_epochs)

    def _single_compress(self, max_steps: Optional[int], max_epochs: Optional[int]) -> None:
        if max_steps is not None or max_epochs is not None:
            raise ValueError(
                "PruneAndGrowPruner.compress() takes no max_steps/max_epochs; set pretrain_epochs, "
                "finetune_epochs and grow_epochs on the strategy"
            )
        em = self.strategy.fit(
            self._plain_copy(), self.train_data, self.val_data, example_inputs=self._dummy_input()
        ).elastic_model
        self.elastic_model = em
        self._load_weights(self._plain_state(em, self.level))
        self.update_masks(self.masks_of(self.level))
        self.level_scores = self._score_levels(em) if self.evaluator is not None else None
        logger.info("prune-and-grow built %d levels (widths %s); the masks describe level %d",
                    em.num_levels, self.strategy.widths, self.level)

    def _fuse_preprocess(self, evaluator: Evaluator) -> None:
        raise ValueError("PruneAndGrowPruner cannot be fused with other compressors; run it on its own")

    def generate_masks(self) -> Masks:
        """NNI-format masks of the chosen level (after ``compress()``)."""
        return self.masks_of(self.level)

    def masks_of(self, level: int) -> Masks:
        """NNI-format masks ``{module: {target: mask}}`` of any level of the elastic model.

        Masks are float tensors shaped like their targets (``None`` for absent targets, e.g. a
        conv without bias): zeros on the output channels the level drops, ones elsewhere.
        """
        em = self._require_fit()
        keep = keep_indices(em.graph, em.channels_of(level))
        masks: Masks = {}
        for module_name, wrapper in self._module_wrappers.items():
            masks[module_name] = {}
            for target_name, space in wrapper.pruning_target_spaces.items():
                target = space.target
                if target is None:
                    masks[module_name][target_name] = None
                    continue
                mask = torch.ones_like(target).detach()
                sel = keep.get((module_name, "out"))  # None: outside every elastic group, never shrinks
                if isinstance(sel, int):
                    mask[sel:] = 0
                elif sel is not None:
                    dropped = torch.ones(mask.shape[0], dtype=torch.bool, device=mask.device)
                    dropped[sel.to(mask.device)] = False
                    mask[dropped] = 0
                masks[module_name][target_name] = mask
        return masks

    def report(self) -> List[Dict[str, Any]]:
        """The strategy's report (one row per level) plus ``score`` from the evaluator and ``masked``."""
        self._require_fit()
        rows = self.strategy.report()
        for i, row in enumerate(rows):
            row["score"] = self.level_scores[i] if self.level_scores is not None else None
            row["masked"] = i == self.level
        return rows

    # ------------------------------------------------------------------ helpers
    def _require_fit(self) -> ElasticModel:
        if self.elastic_model is None:
            raise RuntimeError("PruneAndGrowPruner: call compress() first")
        return self.elastic_model

    def _dummy_input(self) -> Optional[torch.Tensor]:
        if self.evaluator is None:
            return None
        try:
            dummy = self.evaluator.get_dummy_input()
        except NotImplementedError:
            return None
        return dummy[:1].clone() if isinstance(dummy, torch.Tensor) and dummy.dim() >= 2 else None

    def _plain_copy(self) -> nn.Module:
        """A deep copy of the bound model without NNI wrappers (prune-and-grow modifies its model)."""
        wrapped = self._is_wrapped
        if wrapped:
            self.unwrap_model()
        try:
            model = copy.deepcopy(self.bound_model)
        finally:
            if wrapped:
                self.wrap_model()
        for module in model.modules():
            drop_restored_forward(module)
        return model

    @staticmethod
    def _plain_state(em: ElasticModel, level: int) -> Dict[str, torch.Tensor]:
        """Full-width weights with ``level``'s BatchNorm statistics, keyed like the user's model."""
        return em.plain_copy(level if em.bn_mode == "per_level" else 0).state_dict()

    def _load_weights(self, state: Dict[str, torch.Tensor]) -> None:
        """Load ``state`` into the bound model, including the parameters NNI's wrappers hold."""
        wrapped = self._is_wrapped
        if wrapped:
            self.unwrap_model()
        try:
            self.bound_model.load_state_dict(state)
            with torch.no_grad():
                for wrapper in self._module_wrappers.values():
                    for name, space in wrapper.pruning_target_spaces.items():
                        if isinstance(space.target, torch.Tensor):
                            space.target.copy_(getattr(wrapper.module, name))
        finally:
            if wrapped:
                self.wrap_model()

    def _score_levels(self, em: ElasticModel) -> List[Any]:
        scores = []
        for i in range(em.num_levels):
            compact = em.export(i)
            self.evaluator.bind_model(compact)
            try:
                score = self.evaluator.evaluate()
            finally:
                self.evaluator.unbind_model()
            scores.append(score[0] if isinstance(score, tuple) else score)
        return scores

