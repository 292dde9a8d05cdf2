"""NNI 3.0 NAS (``nni.nas``): elastic subnets as a model space, expansion-score growth as a strategy.

- :class:`ElasticSpace` (+ :class:`ElasticEvaluator`): per-stage widths of a trained elastic model
  over its shared weights; any NNI multi-trial strategy (Random, GridSearch,
  RegularizedEvolution, TPE, ...) searches it. A frozen sample is an :class:`ElasticSubnet`.
- :class:`ExpansionGrowthStrategy` (+ :class:`GrowableSpace`, :class:`GrowthEvaluator`):
  expansion-score growth inside NNI's engine, every visited architecture an NNI trial.

Needs ``pytorch_lightning`` (``nni.nas`` imports it): ``pip install -e ".[nas]"``.

Example:
    >>> from nni.nas.experiment import NasExperiment
    >>> from nni.nas.strategy import RegularizedEvolution
    >>> space = ElasticSpace.from_checkpoint("runs/prune_and_grow/digits/elastic.pt")
    >>> exp = NasExperiment(space, ElasticEvaluator(data="digits", max_macs=0.5), RegularizedEvolution())
    >>> exp.run(port=8081); best = exp.export_top_models(formatter="dict")[0]; exp.stop()
    >>> compact = space.export(best)          # = em.export(stage_level(em, best))
"""
from __future__ import annotations

try:
    import pytorch_lightning  # noqa: F401  (nni.nas imports it; say how to get it)
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError('nni_elastic.nni.nas needs pytorch-lightning (nni.nas imports it): '
                      'pip install -e ".[nas]"') from e

from ._nas._growth import ExpansionGrowthStrategy, GrowableSpace, GrowthEvaluator, GrowthStep
from ._nas._space import ElasticEvaluator, ElasticSpace, ElasticSubnet, load_elastic

__all__ = ["ElasticSpace", "ElasticSubnet", "ElasticEvaluator", "load_elastic",
           "ExpansionGrowthStrategy", "GrowableSpace", "GrowthEvaluator", "GrowthStep"]
