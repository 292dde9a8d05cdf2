"""NNI NAS (``nni.nas``): ElasticSpace over shared weights, ExpansionGrowthStrategy in NNI's engine.

Default tests: the space's sampling and freezing, the trial-process rebuild, every multi-trial
strategy on NNI's sequential engine (in process, no NNI manager), function-preserving expansions,
bad input. Slow (``-m slow``): real ``NasExperiment`` runs with NNI's training-service engine
(NNI manager on a free port, one process per trial), each stopped also on failure.
"""
from __future__ import annotations

import copy
import socket

import pytest
import torch

pytest.importorskip("pytorch_lightning", reason="nni.nas needs pytorch-lightning: pip install -e '.[nas]'")

import nni  # noqa: E402
from nni.nas.execution import SequentialExecutionEngine  # noqa: E402
from nni.nas.experiment import NasExperiment  # noqa: E402
from nni.nas.nn.pytorch import ModelSpace  # noqa: E402
from nni.nas.space import RawFormatModelSpace, SimplifiedModelSpace, model_context  # noqa: E402
from nni.nas.strategy import TPE, GridSearch, Random, RegularizedEvolution  # noqa: E402

import nni_elastic as ne  # noqa: E402
from nni_elastic.data import load_dataset  # noqa: E402
from nni_elastic.measure import count_ops  # noqa: E402
from nni_elastic.nni.nas import (  # noqa: E402
    ElasticEvaluator,
    ElasticSpace,
    ElasticSubnet,
    ExpansionGrowthStrategy,
    GrowableSpace,
    GrowthEvaluator,
)
from nni_elastic.stages import model_stages, stage_level  # noqa: E402
from nni_elastic.training import evaluate  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

WIDTHS = (0.25, 0.5, 0.75, 1.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def untrained(tmp_path_factory):
    """A small elastic ResNet-20 for digits (8x8, untrained: the tests check structure, not accuracy)."""
    torch.manual_seed(0)
    model = ne.create_model("resnet20", num_classes=10, in_channels=1)
    em = ne.ElasticModel(model, example_inputs=torch.randn(1, 1, 8, 8), widths=WIDTHS)
    path = tmp_path_factory.mktemp("nas") / "elastic.pt"
    em.save(path, dataset="digits")
    return path


# ---------------------------------------------------------------------- space: sampling and freezing
def test_space_mutables_are_the_stage_widths(untrained):
    space = ElasticSpace.from_checkpoint(untrained)
    mutables = space.simplify()
    assert list(mutables) == model_stages(space.em) == ["conv1", "layer1", "layer2", "layer3"]
    assert all(list(m.values) == list(WIDTHS) for m in mutables.values())
    groups = ElasticSpace.from_checkpoint(untrained, stages="groups", widths=(0.5, 1.0)).simplify()
    assert list(groups) == list(space.em.graph.names) and all(list(m.values) == [0.5, 1.0] for m in groups.values())
    sample = space.random(random_state=__import__("numpy").random.RandomState(0))
    assert isinstance(sample, ElasticSubnet) and set(sample.widths.values()) <= set(WIDTHS)


def test_freezing_shares_the_weights_and_equals_the_export(untrained):
    space = ElasticSpace.from_checkpoint(untrained)
    em = space.em
    sample = {"conv1": 0.5, "layer1": 0.25, "layer2": 1.0, "layer3": 0.75}
    sub = space.freeze(sample)
    # no copy: every parameter of the subnet is the space's own tensor
    own = {p.data_ptr() for p in em.parameters()}
    assert all(p.data_ptr() in own for p in sub.parameters())
    x = torch.randn(4, 1, 8, 8)
    level = stage_level(em, sample)
    with torch.no_grad():
        out, ref = sub.eval()(x), em.export(level).eval()(x)
    assert torch.allclose(out, ref, atol=1e-5)
    assert sub.channels == em.channels_of(level)
    assert count_ops(space.export(sample), x[:1]) == count_ops(em.export(level), x[:1])
    with pytest.raises(Exception, match="0.3"):
        space.freeze({**sample, "layer1": 0.3})  # not a choice of the space


def test_a_trial_process_rebuilds_the_frozen_subnet_from_the_checkpoint(untrained):
    sample = {"conv1": 0.25, "layer1": 0.5, "layer2": 0.75, "layer3": 1.0}
    with model_context(sample):
        sub = ElasticSpace(str(untrained))
    assert isinstance(sub, ElasticSubnet) and sub.widths == sample
    # a space built from a loaded model traces a checkpoint path, not the model (NNI serialises init arguments)
    space = ElasticSpace(ne.ElasticModel.load(untrained))
    assert isinstance(space.trace_kwargs["source"], str) and not space.trace_args
    assert nni.load(nni.dump(space.trace_copy())).trace_kwargs["source"] == space.trace_kwargs["source"]


@pytest.mark.parametrize("strategy", [
    Random(seed=0), GridSearch(seed=0), RegularizedEvolution(population_size=3, sample_size=2, seed=0), TPE(),
], ids=["random", "grid", "evolution", "tpe"])
def test_nni_strategies_search_the_space_on_the_sequential_engine(untrained, strategy):
    space = ElasticSpace.from_checkpoint(untrained, widths=(0.5, 1.0))
    evaluator = ElasticEvaluator(data="digits", max_macs=0.6, val_limit=64, calibrate_batches=2, latency=False)
    engine = SequentialExecutionEngine(max_model_count=4)
    # simplified format: each sample is rebuilt from the checkpoint path, on the process-wide loaded model
    strategy(SimplifiedModelSpace.from_model(space, evaluator), engine)
    models = list(engine.list_models())
    assert len(models) == 4 and all(m.metrics.final is not None for m in models)
    for m in models:  # the reported default is the accuracy within budget, -violation over it
        sub = space.freeze(m.sample)
        ratio = count_ops(sub.export(), torch.zeros(1, 1, 8, 8))[0] / count_ops(space.export(
            {k: 1.0 for k in space.keys}), torch.zeros(1, 1, 8, 8))[0]
        assert (m.metrics.final >= 0) == (ratio <= 0.6 + 1e-9)
    assert len({tuple(sorted(m.sample.items())) for m in models}) == 4  # deduplicated samples


# ---------------------------------------------------------------------- growth: function-preserving neighbours
@pytest.mark.parametrize("label", ["channels0", "blocks1", "channels2"])
def test_growable_space_expansions_preserve_the_function_and_reach_the_neighbour(label):
    space = GrowableSpace(channels=((4, 8), (8, 16), (8, 16)), blocks=((0, 1), (0, 1), (0, 1)))
    small = {k: v[0] for k, v in space.spec.items()}
    torch.manual_seed(0)
    model = space.freeze(small).eval()
    x = torch.randn(16, 1, 8, 8)
    grown = copy.deepcopy(model)
    GrowableSpace.expand(grown, label, small[label], space.spec[label][1], x, x[:1])
    with torch.no_grad():
        assert torch.allclose(grown.eval()(x), model(x), atol=1e-5)
    neighbour = space.freeze({**small, label: space.spec[label][1]})
    assert {k: v.shape for k, v in grown.state_dict().items()} == {k: v.shape for k, v in neighbour.state_dict().items()}


# ---------------------------------------------------------------------- bad input
def test_a_space_with_no_mutable_is_refused(untrained):
    with pytest.raises(ValueError, match="no mutable"):
        ElasticSpace.from_checkpoint(untrained, stages=[])


def test_a_checkpoint_that_is_not_an_elastic_model_is_refused(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save(ne.create_model("resnet20", num_classes=10, in_channels=1).state_dict(), path)
    with pytest.raises(ValueError, match="plain.pt"):
        ElasticSpace.from_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="nni-elastic run"):
        ElasticSpace.from_checkpoint(tmp_path / "missing.pt")


class _ActivationSpace(ModelSpace):
    def __init__(self) -> None:
        super().__init__()
        self.add_mutable(nni.choice("act", ["relu", "gelu"]))
        self.fc = torch.nn.Linear(2, 2)


class _EmptySpace(ModelSpace):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(2, 2)


def test_growth_strategy_refuses_unordered_or_missing_mutables():
    engine = SequentialExecutionEngine(max_model_count=1)
    with pytest.raises(ValueError, match="'act'.*not an ordered size"):
        ExpansionGrowthStrategy().initialize(RawFormatModelSpace.from_model(_ActivationSpace(), GrowthEvaluator()), engine)
    with pytest.raises(ValueError, match="no mutable"):
        ExpansionGrowthStrategy().initialize(RawFormatModelSpace.from_model(_EmptySpace(), GrowthEvaluator()), engine)
    with pytest.raises(ValueError, match="GrowthEvaluator"):
        ExpansionGrowthStrategy().initialize(RawFormatModelSpace.from_model(GrowableSpace(), ElasticEvaluator()), engine)
    with pytest.raises(ValueError, match="threshold=-1"):
        ExpansionGrowthStrategy(threshold=-1)


# ---------------------------------------------------------------------- slow: real NasExperiments
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from nni_elastic.config import load_recipe
    from nni_elastic.runner import run_recipe

    out = tmp_path_factory.mktemp("pg")
    recipe = load_recipe("strategies/prune_and_grow/digits.yaml", {
        "device": "cpu", "data.limit": 600, "strategy.pretrain_epochs": 3, "strategy.finetune_epochs": 1,
        "strategy.grow_epochs": 1, "strategy.calibrate_batches": 4})
    run_recipe(recipe, output=out, quiet=True, exports=False)
    return out / "elastic.pt"


@pytest.mark.slow
def test_nas_experiment_with_regularized_evolution_on_digits(trained, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # NNI's trial code directory is the working directory
    space = ElasticSpace.from_checkpoint(trained)
    evaluator = ElasticEvaluator(data="digits", max_macs=0.5)
    exp = NasExperiment(space, evaluator, RegularizedEvolution(population_size=3, sample_size=2, seed=0))
    exp.config.max_trial_number = 5
    exp.config.experiment_working_directory = str(tmp_path / "nni-experiments")
    try:
        exp.run(port=free_port())
        trials = exp.export_data()
        models = list(exp.export_top_models(top_k=5))
        best = exp.export_top_models(formatter="dict")[0]
    finally:
        exp.stop()
    assert len(trials) == 5 and len(models) == 5
    for t in trials:  # every trial succeeded and reported the whole metric dict
        assert {"default", "accuracy", "macs", "params", "latency_ms", "feasible"} <= set(t.value), t
    assert best == models[0].sample and models[0].metric == max(t.value["default"] for t in trials)
    # the exported best subnet is em.export of that configuration, with the reported cost
    em = ne.ElasticModel.load(trained)
    x = torch.zeros(1, 1, 8, 8)
    exported, reference = space.export(best), em.export(stage_level(em, best))
    with torch.no_grad():
        assert torch.allclose(exported.eval()(x), reference.eval()(x), atol=1e-5)
    row = next(t.value for t in trials if t.value["default"] == models[0].metric)
    assert count_ops(reference, x) == (row["macs"], row["params"])


@pytest.mark.slow
def test_expansion_growth_strategy_grows_monotonically_and_stops(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    threshold = 0.05
    strategy = ExpansionGrowthStrategy(threshold=threshold, damping=1.0, check_every=30, checkpoint_dir=tmp_path / "g")
    space = GrowableSpace()
    exp = NasExperiment(space, GrowthEvaluator(data="digits"), strategy)
    exp.config.max_trial_number = 6
    exp.config.experiment_working_directory = str(tmp_path / "nni-experiments")
    try:
        exp.run(port=free_port())
        trials = exp.export_data()
    finally:
        exp.stop()
    steps = strategy.history
    assert steps and len(trials) == len(steps)
    assert steps[0].sample == {k: v[0] for k, v in space.spec.items()}  # starts from the smallest
    for prev, nxt in zip(steps, steps[1:]):  # one mutable one step up, towards the best-scored neighbour
        assert prev.grew and prev.gains[prev.best] > threshold
        changed = [k for k in prev.sample if prev.sample[k] != nxt.sample[k]]
        assert changed == [prev.best]
        assert space.spec[prev.best].index(nxt.sample[prev.best]) == space.spec[prev.best].index(prev.sample[prev.best]) + 1
        assert nxt.metric["params"] > prev.metric["params"]
    last = steps[-1]
    assert strategy.stop_reason in ("threshold", "budget", "largest")
    if strategy.stop_reason == "threshold":
        assert last.gains[last.best] <= threshold and not last.grew
    else:
        assert len(steps) == 6 or strategy.stop_reason == "largest"
    # every reported accuracy reproduces from its checkpoint
    val = load_dataset("digits").val
    for step in steps:
        model = space.freeze(step.sample)
        model.load_state_dict(torch.load(step.checkpoint, weights_only=True))
        assert evaluate(model.eval(), val, device="cpu")["accuracy"] == pytest.approx(step.metric["accuracy"], abs=1e-12)
    assert sorted(t.value["accuracy"] for t in trials) == sorted(s.metric["accuracy"] for s in steps)
    assert all({"default", "accuracy", "params", "macs"} <= set(t.value) for t in trials)

    # a threshold no gain passes: one visited architecture, stopped by the threshold
    high = ExpansionGrowthStrategy(threshold=1e9, check_every=5, checkpoint_dir=tmp_path / "h")
    exp = NasExperiment(GrowableSpace(), GrowthEvaluator(data="digits"), high, _sequential(3, tmp_path))
    try:
        exp.run(port=free_port())
    finally:
        exp.stop()
    assert len(high.history) == 1 and high.stop_reason == "threshold"


def _sequential(trials: int, workdir):
    from nni.nas.experiment import NasExperimentConfig

    cfg = NasExperimentConfig("sequential", "simplified")
    cfg.experiment_working_directory = str(workdir / "nni-experiments")
    cfg.max_trial_number = trials
    cfg.execution_engine.max_model_count = trials
    return cfg
