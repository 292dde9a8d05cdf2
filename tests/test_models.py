"""Properties of the model zoo: every model builds, runs on small inputs and rebuilds from its arch."""
from __future__ import annotations

import json

import pytest
import torch
import torch_pruning as tp
from torch import nn

from nni_elastic.models import GrowableCNN, create_model, list_models

ALL_MODELS = list_models()


def test_zoo_contents() -> None:
    expected = {"resnet20", "resnet56", "resnet_cifar", "vgg16_bn", "alexnet", "growable_cnn",
                "mobilenetv2_tiny", "densenet_tiny"}
    assert expected <= set(ALL_MODELS)


@pytest.mark.parametrize("name", ALL_MODELS)
@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("num_classes", [2, 10])
def test_builds_and_runs_on_small_inputs(name: str, in_channels: int, num_classes: int) -> None:
    model = create_model(name, num_classes=num_classes, in_channels=in_channels).eval()
    with torch.no_grad():
        for size in (8, 28, 32):
            out = model(torch.randn(2, in_channels, size, size))
            assert out.shape == (2, num_classes)
            assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ALL_MODELS)
def test_arch_round_trips(name: str) -> None:
    kwargs = {"width_multiplier": 0.5} if name != "growable_cnn" else {"blocks": (0, 2, 1)}
    model = create_model(name, num_classes=7, in_channels=1, **kwargs)
    arch = json.loads(json.dumps(model.nni_elastic_arch))  # what a checkpoint file would hold
    assert arch["name"] == name
    rebuilt = create_model(arch["name"], **arch["kwargs"])
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == shapes
    rebuilt.load_state_dict(model.state_dict())


def test_unknown_name_lists_known_models() -> None:
    with pytest.raises(ValueError, match="no_such_net") as info:
        create_model("no_such_net")
    for name in ALL_MODELS:
        assert name in str(info.value)


@pytest.mark.parametrize("arg, value", [("num_classes", 0), ("num_classes", -3), ("num_classes", 2.5),
                                        ("in_channels", 0), ("in_channels", True)])
def test_bad_sizes_raise(arg: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"{arg}.*{value!r}"):
        create_model("resnet20", **{arg: value})


def test_bad_kwargs_raise() -> None:
    with pytest.raises(ValueError, match="depth"):
        create_model("resnet_cifar", depth=21)
    with pytest.raises(ValueError, match="width_multiplier"):
        create_model("resnet20", width_multiplier=0)
    with pytest.raises(ValueError, match="not_json"):
        create_model("resnet20", not_json=object())


def _count_3x3_convs(model: nn.Module) -> int:
    return sum(isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) for m in model.modules())


@pytest.mark.parametrize("name, depth", [("resnet20", 20), ("resnet56", 56)])
def test_resnet_depth(name: str, depth: int) -> None:
    model = create_model(name)
    assert _count_3x3_convs(model) == depth - 1  # all weighted layers but the Linear head
    assert _count_3x3_convs(create_model("resnet_cifar", depth=depth)) == depth - 1
    shortcuts = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
    assert len(shortcuts) == 2  # option B projections entering stages 2 and 3


def test_width_multiplier_halves_resnet20() -> None:
    full = [m.out_channels for m in create_model("resnet20").modules() if isinstance(m, nn.Conv2d)]
    half = [m.out_channels for m in create_model("resnet20", width_multiplier=0.5).modules()
            if isinstance(m, nn.Conv2d)]
    assert half == [c // 2 for c in full]
    assert sorted(set(half)) == [8, 16, 32]


def test_growable_add_block_preserves_function() -> None:
    torch.manual_seed(0)
    model = create_model("growable_cnn", channels=(8, 16, 16), blocks=(1, 0, 1))
    assert isinstance(model, GrowableCNN)
    model.train()
    with torch.no_grad():  # give BN non-trivial running statistics
        for _ in range(3):
            model(torch.randn(8, 3, 16, 16) * 2 + 1)
    model.eval()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        before = model(x)
        for stage in (1, 0, -1, 1):
            block = model.add_block(stage)
            assert not block.training
            after = model(x)
            # BN uses running stats only in eval mode, so this is where the identity holds.
            assert (after - before).abs().max().item() < 1e-6
    assert model.block_counts == [2, 2, 2]
    assert model.nni_elastic_arch["kwargs"]["blocks"] == [2, 2, 2]
    rebuilt = create_model("growable_cnn", **model.nni_elastic_arch["kwargs"])
    rebuilt.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), model(x))


def test_growable_add_block_bad_index() -> None:
    model = create_model("growable_cnn")
    with pytest.raises(ValueError, match="stage_index"):
        model.add_block(3)


@pytest.mark.parametrize("name", ALL_MODELS)
@pytest.mark.parametrize("in_channels", [1, 3])
def test_torch_pruning_dependency_graph(name: str, in_channels: int) -> None:
    model = create_model(name, in_channels=in_channels).eval()
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, in_channels, 32, 32))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(conv in graph.module2node for conv in convs)
