"""Channel importance: torch-pruning's Hessian criterion, and re-ranking a level's prefix on that level alone."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import nni_elastic as ne
from nni_elastic import ElasticModel
from nni_elastic.graph import GRADIENT_IMPORTANCES, IMPORTANCES, accumulate_gradients
from nni_elastic.strategies import ElasticOptions

WIDTHS = (0.25, 0.5, 1.0)


@pytest.fixture(scope="module")
def trained(one_thread):
    """resnet20 trained a few steps on digits (gradients and weights no longer at initialisation)."""
    splits = ne.data.load_dataset("digits", limit=128)
    data = list(ne.data.make_loader(splits.train, 32, shuffle=False))
    torch.manual_seed(0)
    model = ne.create_model("resnet20", num_classes=10, in_channels=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for x, y in data * 3:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model, splits.example_inputs(), data


def wrap(trained, importance: str = "l1", **kwargs) -> ElasticModel:
    model, example, data = trained
    return ElasticModel(copy.deepcopy(model), example, widths=WIDTHS, importance=importance, data=data, **kwargs)


@torch.no_grad()
def out(em: ElasticModel, level, x: torch.Tensor) -> torch.Tensor:
    with em.use_level(level):
        return em.eval()(x)


def test_hessian_is_a_known_gradient_importance():
    assert "hessian" in IMPORTANCES and GRADIENT_IMPORTANCES["hessian"] == "sample"
    assert ElasticOptions(importance="hessian").importance == "hessian"  # recipes accept it
    with pytest.raises(ValueError, match=r"'hessian' needs gradients: pass data="):
        ElasticModel(ne.create_model("resnet20", num_classes=10, in_channels=1), torch.zeros(1, 1, 8, 8),
                     importance="hessian")


def test_hessian_ranks_preserves_the_function_and_differs_from_l1(trained):
    model, _, data = trained
    x = data[0][0]
    reference = copy.deepcopy(model).eval()(x).detach()
    em = wrap(trained, "hessian")  # the constructor's self-check compares every level with its export
    assert torch.allclose(out(em, -1, x), reference, rtol=1e-4, atol=1e-5)
    assert all(p.grad is None for p in em.parameters())
    l1 = wrap(trained, "l1")
    differ = [g.name for g in em.graph.groups
              if not torch.equal(em.model.get_submodule(g.name).weight, l1.model.get_submodule(g.name).weight)]
    assert differ  # another order of the channels
    assert not torch.equal(out(em, 0, x), out(l1, 0, x))


def test_hessian_gradients_are_the_mean_squared_per_sample_gradients(trained):
    model, _, data = trained
    net = copy.deepcopy(model).eval()
    accumulate_gradients(net, data[:1], F.cross_entropy, "hessian", max_samples=3)
    x, y = data[0]
    expected = torch.zeros_like(net.fc.weight)
    for j in range(3):
        g, = torch.autograd.grad(F.cross_entropy(net(x[j:j + 1]), y[j:j + 1]), net.fc.weight)
        expected += g.pow(2) / 3
    assert torch.allclose(net.fc.weight.grad, expected, rtol=1e-4, atol=1e-9)


def _huge_outside(em: ElasticModel, level: int) -> str:
    """Make huge the weights of a level-0-kept input channel of ``layer1.0.conv2`` that only output channels
    outside the level read; returns the group of that input channel."""
    conv = em.model.layer1[0].conv2
    k_out = em.levels_[level].channels["conv1"]  # conv2's outputs join the residual group of conv1
    with torch.no_grad():
        conv.weight[k_out:, 0] = 1e4  # input channel 0 is the first one the level keeps
    return "layer1.0.conv1"


@pytest.mark.parametrize("importance", ["l1", "taylor"])
def test_prefix_ranking_ignores_weights_outside_the_level(trained, importance):
    prefix = None
    perms = []
    for huge in (False, True):
        em = wrap(trained, importance)
        x = trained[2][0][0]
        before = out(em, 0, x)
        group = _huge_outside(em, 0) if huge else "layer1.0.conv1"
        prefix = em.channels_of(0)
        perms.append(em.reorder(importance, data=trained[2], prefix=prefix)[group])
        assert torch.allclose(out(em, 0, x), before, rtol=1e-4, atol=1e-5)  # a reorder keeps the function
    k = prefix[group]
    assert torch.equal(perms[0], perms[1]) and not torch.equal(perms[0][:k], torch.arange(k))
    assert torch.equal(perms[0][k:], torch.arange(k, len(perms[0])))  # channels outside stay in place


def test_whole_model_ranking_sees_those_weights(trained):
    em = wrap(trained, "l1")
    _huge_outside(em, 0)
    perm = em.reorder("l1")["layer1.0.conv1"]
    assert int(perm[0]) == 0  # without a prefix the huge input column ranks its channel first


def test_prefix_scores_equal_scores_on_the_export(trained):
    from nni_elastic.graph import build_channel_graph, rank_channels

    em = wrap(trained, "l1")
    channels = em.channels_of(1)
    scores = em._level_scores("l1", channels, None, F.cross_entropy, {})
    exported = em.export(1)
    direct = rank_channels(build_channel_graph(exported, torch.zeros(1, 1, 8, 8)), "l1")
    for g in em.graph.groups:
        k = channels[g.name]
        assert torch.equal(scores[g.name][sorted(g.order[:k])], direct[g.name]), g.name
