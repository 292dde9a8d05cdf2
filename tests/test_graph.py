"""Properties of the channel graph: groups describe the model, reordering preserves its function.

Every test builds a real torch-pruning dependency graph on a zoo model; no mocks.
"""
from __future__ import annotations

import re

import pytest
import torch
import torch_pruning as tp
from torch import nn

from elastic_utils import NUM_CLASSES, TOL, ZOO, batch, perturb_bn, rel_diff
from nni_elastic import ElasticModel, UnsupportedModuleError, build_channel_graph, create_model
from nni_elastic.graph import (
    IMPORTANCES,
    create_importance,
    keep_indices,
    rank_channels,
    reorder_channels,
)


def _zoo_model(name: str, in_channels: int = 3, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    model = create_model(name, num_classes=NUM_CLASSES, in_channels=in_channels)
    x = batch(in_channels, seed=seed)
    perturb_bn(model, x, seed=seed)
    return model.eval(), x


@torch.no_grad()
def _outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.eval()(x)


def _negated_l1(group: object) -> torch.Tensor:
    """A user-defined criterion: the reverse of the L1 ranking (so the order surely changes)."""
    return -tp.importance.GroupMagnitudeImportance(p=1)(group)


def _last_linear(model: nn.Module) -> str:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)][-1]


# --------------------------------------------------------------------------- groups


@pytest.mark.parametrize("name", ZOO)
def test_groups_describe_the_model(name: str) -> None:
    model, x = _zoo_model(name)
    graph = build_channel_graph(model, x[:1])
    assert graph.groups, "every zoo model has channels that can shrink"
    classifier = _last_linear(model)
    assert classifier in graph.fixed and classifier not in graph.names  # the output never shrinks

    owner: dict[tuple[str, str, int], str] = {}
    for g in graph.groups:
        root = [m for m in g.members if m.module == g.name and m.dim == "out"]
        assert len(root) == 1 and root[0].positions == tuple((r,) for r in range(g.size))
        for m in g.members:
            assert len(m.positions) == g.size
            full = graph.dims[(m.module, m.dim)]
            used = [i for p in m.positions for i in p]
            assert len(used) == len(set(used)) and all(0 <= i < full for i in used)
            for i in used:  # one tensor index belongs to one group only: levels never conflict
                assert owner.setdefault((m.module, m.dim, i), g.name) == g.name
    for (module_name, dim), full in graph.dims.items():
        module = model.get_submodule(module_name)
        weight = module.weight if module.weight is not None else module.running_mean
        assert full == (weight.shape[0] if dim == "out" else weight.shape[1])


def test_ignored_layer_group_is_fixed() -> None:
    model, x = _zoo_model("resnet20")
    graph = build_channel_graph(model, x[:1], ignored_layers=["layer1.0.conv1", model.get_submodule("layer2.1.conv1")])
    assert {"layer1.0.conv1", "layer2.1.conv1"} <= set(graph.fixed)
    assert not {"layer1.0.conv1", "layer2.1.conv1"} & set(graph.names)
    assert "layer1.1.conv1" in graph.names  # only the ignored groups are fixed


# --------------------------------------------------------------------------- reorder


@pytest.mark.parametrize("name", ZOO)
def test_reorder_preserves_outputs(name: str) -> None:
    model, x = _zoo_model(name)
    before = _outputs(model, x)
    graph = build_channel_graph(model, x[:1])
    torch.manual_seed(1)
    perms = reorder_channels(model, graph, rank_channels(graph, "random"))
    assert any(not torch.equal(p, torch.arange(len(p))) for p in perms.values()), "the test must move channels"
    assert rel_diff(_outputs(model, x), before) <= TOL


IMPORTANCE_CASES = ["l1", "l2", "bn", "taylor", "random", _negated_l1]


@pytest.mark.parametrize("importance", IMPORTANCE_CASES, ids=lambda i: getattr(i, "__name__", i))
@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2_tiny", "densenet_tiny"])
def test_reorder_preserves_outputs_for_every_importance(name: str, importance: object) -> None:
    model, x = _zoo_model(name)
    before = _outputs(model, x)
    graph = build_channel_graph(model, x[:1])
    if importance == "taylor":  # gradient criterion: one backward pass (eval mode keeps BN statistics)
        nn.functional.cross_entropy(model.eval()(x), torch.arange(len(x)) % NUM_CLASSES).backward()
    torch.manual_seed(1)
    scores = rank_channels(graph, importance)
    model.zero_grad(set_to_none=True)
    assert set(scores) == set(graph.names)
    assert all(s.shape == (graph.group(g).size,) for g, s in scores.items())
    perms = reorder_channels(model, graph, scores)
    assert any(not torch.equal(p, torch.arange(len(p))) for p in perms.values())
    assert rel_diff(_outputs(model, x), before) <= TOL


@pytest.mark.parametrize("name", ZOO)
def test_reorder_puts_important_channels_first(name: str) -> None:
    model, x = _zoo_model(name)
    graph = build_channel_graph(model, x[:1])
    reorder_channels(model, graph, rank_channels(graph, "l1"))
    for g, s in rank_channels(graph, "l1").items():  # re-ranking the reordered model
        assert torch.all(s[:-1] >= s[1:] - 1e-6 * s.abs().max()), f"group {g} is not sorted: {s}"


def test_prefix_reorder_leaves_the_rest_in_place() -> None:
    model, x = _zoo_model("resnet20")
    before = _outputs(model, x)
    graph = build_channel_graph(model, x[:1])
    group = max(graph.groups, key=lambda g: len(g.members))  # the residual group: many members
    k = group.size // 2
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    torch.manual_seed(2)
    scores = {group.name: rank_channels(graph, "random")[group.name]}
    perms = reorder_channels(model, graph, scores, prefix={group.name: k})
    assert list(perms) == [group.name]  # groups without scores are not touched
    perm = perms[group.name]
    assert torch.equal(perm[k:], torch.arange(k, group.size)) and sorted(perm[:k].tolist()) == list(range(k))
    assert not torch.equal(perm, torch.arange(group.size))
    for m in group.members:
        weight = dict(model.named_parameters()).get(f"{m.module}.weight")
        if weight is None:
            continue
        axis = 0 if m.dim == "out" or weight.dim() == 1 else 1
        outside = torch.tensor([i for p in m.positions[k:] for i in p], dtype=torch.long)
        old = params[f"{m.module}.weight"]
        assert torch.equal(weight.index_select(axis, outside), old.index_select(axis, outside)), m.module
    assert rel_diff(_outputs(model, x), before) <= TOL


@pytest.mark.parametrize("name", ["resnet20", "densenet_tiny", "vgg16_bn"])
def test_keep_indices_match_the_level(name: str) -> None:
    model, x = _zoo_model(name)
    graph = build_channel_graph(model, x[:1])
    full = keep_indices(graph, {g.name: g.size for g in graph.groups})
    assert full == graph.dims  # the full level keeps every index, as a plain prefix length
    level = {g.name: max(1, g.size // 3) for g in graph.groups}
    kept = keep_indices(graph, level)
    for key, sel in kept.items():
        dropped = sum(len(p) for g in graph.groups for m in g.members if (m.module, m.dim) == key
                      for p in m.positions[level[g.name]:])
        count = sel if isinstance(sel, int) else len(sel)
        assert count == graph.dims[key] - dropped
        if not isinstance(sel, int):  # explicit indices: sorted, unique, in range, not a prefix
            assert sel.tolist() == sorted(set(sel.tolist())) and 0 <= sel.min() and sel.max() < graph.dims[key]
            assert sel.tolist() != list(range(count))


# --------------------------------------------------------------------------- importance


def test_unknown_importance_lists_known_ones() -> None:
    with pytest.raises(ValueError, match="no_such_criterion") as info:
        create_importance("no_such_criterion")
    for known in IMPORTANCES.names():
        assert known in str(info.value)


def test_importance_with_wrong_length_names_the_group() -> None:
    model, x = _zoo_model("growable_cnn")
    graph = build_channel_graph(model, x[:1])
    with pytest.raises(ValueError, match=rf"{re.escape(graph.names[0])}.*3 scores, expected"):
        rank_channels(graph, lambda group: torch.ones(3))


# --------------------------------------------------------------------------- unsupported modules


class ChannelScale(nn.Module):
    """A custom op torch-pruning cannot prune: a bare per-channel parameter."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.view(1, -1, 1, 1)


class ScaledNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.scale = nn.Conv2d(8, 12, 3, padding=1), ChannelScale(12)
        self.conv3, self.bn3 = nn.Conv2d(12, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.scale(self.conv2(x)))
        x = torch.relu(self.bn3(self.conv3(x)))
        return self.fc(x.mean((2, 3)))


class GroupNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.norm1 = nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8)
        self.conv2, self.bn2 = nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.norm1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


class GroupedConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.conv3 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv3(torch.relu(self.conv2(x))))
        return self.fc(x.mean((2, 3)))


class UnequalSplitNet(nn.Module):
    """A mixed-kernel block: the forward splits channels into unequal literal sizes, so they cannot shrink."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv_a, self.conv_b = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(6, 4, 1)
        self.conv3 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.relu(self.bn1(self.conv1(x))).split([2, 6], dim=1)
        x = torch.relu(self.conv3(torch.cat([self.conv_a(a), self.conv_b(b)], 1)))
        return self.fc(x.mean((2, 3)))


class ScaledConv(nn.Conv2d):
    """A convolution subclass with a tensor of its own that nni-elastic cannot know how to slice."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.ones(self.out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.gain.view(1, -1, 1, 1)


class OwnTensorNet(ScaledNet):
    def __init__(self) -> None:
        super().__init__()
        self.conv2 = ScaledConv(8, 12, 3, padding=1)


def _weight_normed() -> nn.Module:
    net = ScaledNet()
    nn.utils.parametrizations.weight_norm(net.conv3)
    return net


@pytest.mark.parametrize("net", [ScaledNet, GroupNormNet, GroupedConvNet])
def test_formerly_refused_layers_are_sliced(net: type) -> None:
    """Bare parameters, GroupNorm and grouped convolutions shrink: every level equals its export."""
    torch.manual_seed(0)
    x = batch(3)
    em = ElasticModel(net(), x[:1], widths=(0.5, 1.0)).eval()
    assert not em.graph.problems
    for level in range(em.num_levels):
        em.set_level(level)
        with torch.no_grad():
            assert rel_diff(em(x), em.export(level)(x)) <= TOL
    assert em.levels[0].params < em.levels[1].params


@pytest.mark.parametrize(
    "net, path, kind",
    [
        (UnequalSplitNet, "conv1", "unequal chunks [2, 6]"),
        (OwnTensorNet, "conv2", "ScaledConv"),
        (_weight_normed, "conv3", "parametrized"),
    ],
)
def test_unsupported_module_is_named_and_the_fix_works(net, path: str, kind: str) -> None:
    torch.manual_seed(0)
    x = batch(3)
    with pytest.raises(UnsupportedModuleError) as info:
        ElasticModel(net(), x[:1])
    message = str(info.value)
    assert repr(path) in message and kind in message and "ignored_layers" in message
    assert "unsupported='keep'" in message

    suggested = re.search(r"ignored_layers=(\[[^\]]*\])", message)
    assert suggested, message
    for kwargs in ({"ignored_layers": eval(suggested.group(1))}, {"unsupported": "keep"}):
        em = ElasticModel(net(), x[:1], widths=(0.5, 1.0), **kwargs).eval()
        for level in range(em.num_levels):
            em.set_level(level)
            with torch.no_grad():
                assert rel_diff(em(x), em.export(level)(x)) <= TOL
        assert em.levels[0].params < em.levels[1].params  # the other groups still shrink


def test_unknown_ignored_layer_is_named() -> None:
    model, x = _zoo_model("growable_cnn")
    with pytest.raises(ValueError, match=r"'stages\.9\.conv'.*named_modules"):
        build_channel_graph(model, x[:1], ignored_layers=["stages.9.conv"])


def test_untraceable_model_error_names_the_shape() -> None:
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.conv(x) + y

    with pytest.raises(ValueError, match=r"could not trace TwoInputs.*\(1, 3, 8, 8\)"):
        build_channel_graph(TwoInputs(), torch.zeros(1, 3, 8, 8))


def test_graph_builds_under_no_grad_and_inference_mode() -> None:
    model, x = _zoo_model("growable_cnn")
    expected = build_channel_graph(model, x[:1]).names
    with torch.no_grad():
        assert build_channel_graph(model, x[:1]).names == expected
    with torch.inference_mode():
        assert build_channel_graph(model, x[:1]).names == expected
