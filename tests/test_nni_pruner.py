"""``nni_elastic.nni.PruneAndGrowPruner`` against real NNI 3.0 and real torch-pruning (no mocks).

Properties: it is an NNI ``Pruner``; its masks have the keys, targets, shapes and dtypes of NNI's own
``L1NormPruner`` for the same ``config_list`` and zero exactly the channels the level drops; NNI's
``ModelSpeedup`` (with the documented ``torch.fx`` workaround) and ``speedup_with_masks`` both turn
the masks into the level's compact model; ratios become levels; bad inputs fail clearly.
"""
from __future__ import annotations

import copy

import pytest
import torch

nni = pytest.importorskip("nni")

from nni.compression.base.compressor import Pruner  # noqa: E402
from nni.compression.pruning import L1NormPruner  # noqa: E402
from nni.compression.utils import TorchEvaluator  # noqa: E402
from schema import SchemaError  # noqa: E402

from nni_elastic import ElasticModel, PruneAndGrow  # noqa: E402
from nni_elastic.data import load_dataset  # noqa: E402
from nni_elastic.models import create_model  # noqa: E402
from nni_elastic.nni import PruneAndGrowPruner, speedup_with_masks  # noqa: E402
from nni_elastic.training import evaluate  # noqa: E402

CONFIG = [{"op_types": ["Conv2d"], "sparse_ratio": 0.5}]
FAST = dict(pretrain_epochs=1, finetune_epochs=1, grow_epochs=1, prune_steps=1, quiet=True, device="cpu")
TOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def splits():
    return load_dataset("digits", limit=300)


def fresh_model(splits):
    torch.manual_seed(0)
    return create_model("resnet20", num_classes=splits.num_classes, in_channels=splits.in_channels)


def make_evaluator(model, splits):
    def training_func(*args, **kwargs):  # never called: prune-and-grow trains with its own loop
        raise AssertionError("PruneAndGrowPruner must not call the evaluator's training_func")

    def training_step(batch, model):
        x, y = batch
        return torch.nn.functional.cross_entropy(model(x), y)

    optimizer = nni.trace(torch.optim.SGD)(model.parameters(), lr=0.01)
    return TorchEvaluator(training_func, optimizer, training_step, dummy_input=splits.example_inputs(2),
                          evaluating_func=lambda m: evaluate(m, splits.val, device="cpu")["accuracy"])


@pytest.fixture(scope="module")
def compressed(splits):
    model = fresh_model(splits)
    pruner = PruneAndGrowPruner(model, CONFIG, make_evaluator(model, splits),
                                train_data=splits.train, val_data=splits.val, **FAST)
    out, masks = pruner.compress()
    return model, pruner, out, masks


def out_channels(em: ElasticModel, level: int) -> dict[str, tuple[int, int]]:
    """``{module: (kept, size)}`` of every module whose output channels a level slices."""
    channels = em.channels_of(level)
    return {m.module: (channels[g.name], g.size) for g in em.graph.groups for m in g.members if m.dim == "out"}


def zero_rows(mask: torch.Tensor) -> torch.Tensor:
    return mask.reshape(mask.shape[0], -1).eq(0).all(dim=1)


def masked_copy(model, masks):
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, targets in masks.items():
            for target, mask in targets.items():
                if mask is not None:
                    getattr(out.get_submodule(name), target).mul_(mask)
    return out


def test_is_an_nni_pruner_and_compress_returns_model_and_masks(compressed):
    model, pruner, out, masks = compressed
    assert isinstance(pruner, Pruner)
    assert out is model  # NNI returns the bound model, still wrapped
    assert hasattr(model.conv1, "_nni_wrapper")
    assert isinstance(pruner.elastic_model, ElasticModel)
    assert pruner.elastic_model.num_levels == 2 and pruner.level == 0
    rows = pruner.report()
    assert [r["level"] for r in rows] == [0, 1] and [r["masked"] for r in rows] == [True, False]
    assert len(pruner.level_scores) == 2 and all(0.0 <= s <= 1.0 for s in pruner.level_scores)
    assert [r["score"] for r in rows] == pruner.level_scores
    # every level of the elastic model runs (eval mode: train-mode forwards would move BN statistics)
    em, x = pruner.elastic_model.eval(), torch.randn(3, 1, 8, 8)
    for level in range(em.num_levels):
        with torch.no_grad(), em.use_level(level):
            assert em(x).shape == (3, 10)


def test_masks_match_l1norm_pruner_format_and_level_channels(splits, compressed):
    _, pruner, _, masks = compressed
    reference = L1NormPruner(fresh_model(splits), CONFIG).compress()[1]
    assert set(masks) == set(reference)
    kept = out_channels(pruner.elastic_model, pruner.level)
    for name, targets in masks.items():
        assert set(targets) == set(reference[name]), name
        for target, mask in targets.items():
            ref = reference[name][target]
            assert (mask is None) == (ref is None), (name, target)
            if mask is None:
                continue
            assert mask.shape == ref.shape and mask.dtype == ref.dtype, (name, target)
            assert set(mask.unique().tolist()) <= {0.0, 1.0}
            k, size = kept[name]
            dropped = zero_rows(mask)
            assert int(dropped.sum()) == size - k, name  # whole channels: the level's count
            assert not mask[~dropped].eq(0).any()
            sparsity = float(dropped.float().mean())
            assert abs(sparsity - 0.5) <= 1.0 / size, name
            assert abs(sparsity - float(zero_rows(ref).float().mean())) <= 1.0 / size, name


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")  # NNI's speedup import (pytree)
def test_speedup_gives_the_level_exactly(splits, compressed):
    from nni.compression.speedup import ModelSpeedup

    model, pruner, _, masks = compressed
    em = pruner.elastic_model
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        wrapped_out = model(x)  # NNI applies the masks in the wrapped forward
    direct = speedup_with_masks(model, masks, splits.example_inputs())  # accepts the wrapped model too
    pruner.unwrap_model()
    try:
        with torch.no_grad():
            torch.testing.assert_close(masked_copy(model, masks)(x), wrapped_out, rtol=0, atol=TOL)
        ours = speedup_with_masks(model, masks, splits.example_inputs())
        nni_model = copy.deepcopy(model).eval()
        # NNI issue 5768 workaround: NNI's concrete_trace fails on torch >= 2.2, torch.fx does not
        ModelSpeedup(nni_model, splits.example_inputs(2), masks,
                     graph_module=torch.fx.symbolic_trace(nni_model)).speedup_model()
        nni_model.eval()  # the modules ModelSpeedup swaps in come back in training mode
    finally:
        pruner.wrap_model()
    exported = em.export(pruner.level)
    em.eval()
    with torch.no_grad(), em.use_level(pruner.level):
        sliced = em(x)
        reference = exported(x)
        torch.testing.assert_close(reference, sliced, rtol=0, atol=TOL)
        for what, compact in (("direct", direct), ("ours", ours), ("nni", nni_model)):
            torch.testing.assert_close(compact(x), reference, rtol=0, atol=TOL, msg=what)
    params = em.levels[pruner.level].params
    for compact in (direct, ours, nni_model, exported):
        assert sum(p.numel() for p in compact.parameters()) == params


def test_several_ratios_make_several_levels(splits):
    stage3 = [f"layer3.{i}.conv1" for i in range(3)]
    config = [
        {"op_names": stage3, "sparse_ratio": 0.25},
        {"op_types": ["Conv2d"], "exclude_op_names": ["conv1", *stage3], "sparse_ratio": 0.5},
    ]
    model = fresh_model(splits)
    pruner = PruneAndGrowPruner(model, config, train_data=splits.train, val_data=splits.val, **{**FAST, "prune_steps": 2})
    assert pruner.strategy.widths == [0.5, 0.75, 1.0] and pruner.level == 0
    _, masks = pruner.compress()
    em = pruner.elastic_model
    assert em.num_levels == 3
    assert "conv1" not in masks  # excluded: not targeted, and its channels never shrink
    for name in ("layer1.0.conv2", "layer1.2.conv2"):  # coupled to conv1 by the residual sums
        assert masks[name]["weight"].eq(1).all()
    for level, ratio in ((0, 0.5), (1, 0.25), (2, 0.0)):
        level_masks = pruner.masks_of(level)
        for name in ("layer3.0.conv1", "layer2.0.conv1"):
            assert float(zero_rows(level_masks[name]["weight"]).float().mean()) == pytest.approx(ratio, abs=1 / 32)
    # one ratio plus extra widths: the default level is the config's sparsity
    more = PruneAndGrowPruner(fresh_model(splits), CONFIG, train_data=splits.train, val_data=splits.val,
                              widths=(0.25,), **{**FAST, "prune_steps": 2})
    assert more.strategy.widths == [0.25, 0.5, 1.0] and more.level == 1


def test_bad_inputs_fail_clearly(splits):
    model = fresh_model(splits)
    with pytest.raises(ValueError, match="missing: train_data"):
        PruneAndGrowPruner(model, CONFIG, val_data=splits.val)
    with pytest.raises(ValueError, match="missing: val_data"):
        PruneAndGrowPruner(model, CONFIG, train_data=splits.train)
    data = dict(train_data=splits.train, val_data=splits.val)
    with pytest.raises(SchemaError):  # NNI's own config validation
        PruneAndGrowPruner(model, [{"op_types": ["Conv2d"], "sparse_ratio": "half"}], **data)
    with pytest.raises(SchemaError):
        PruneAndGrowPruner(model, [{"sparse_ratio": 0.5}], **data)
    with pytest.raises(ValueError, match="granularity"):
        PruneAndGrowPruner(model, [{"op_types": ["Conv2d"], "sparse_ratio": 0.5, "granularity": "in_channel"}], **data)
    with pytest.raises(ValueError, match=r"outside \[0, 1\)"):
        PruneAndGrowPruner(model, [{"op_types": ["Conv2d"], "sparse_ratio": 1.0}], **data)
    with pytest.raises(ValueError, match="lack the widths"):
        PruneAndGrowPruner(model, CONFIG, strategy=PruneAndGrow(widths=(0.25, 1.0)), **data)
    with pytest.raises(ValueError, match="level=5"):
        PruneAndGrowPruner(model, CONFIG, level=5, **data)
    assert not any(hasattr(m, "_nni_wrapper") for m in model.modules())  # failures leave the model unwrapped


def test_import_nni_elastic_does_not_import_nni():
    import subprocess
    import sys

    code = "import sys, nni_elastic; sys.exit(1 if any(m == 'nni' or m.startswith('nni.') for m in sys.modules) else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
