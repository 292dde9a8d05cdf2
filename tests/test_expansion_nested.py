"""Growth history as nested sub-networks (``history="nested"``): the level inside the grown model is
the old architecture exactly, its export equals its forward, joint training moves the weights it
should, checkpoints hold the final weights and load as before, resume is exact."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import nni_elastic as ne
from nni_elastic.expansion import add_block, widen_group
from nni_elastic.expansion.nested import NestedLevel, choose_levels, nested_step
from nni_elastic.graph import build_channel_graph
from nni_elastic.strategies import load_growth_checkpoint
from nni_elastic.training import evaluate


@pytest.fixture(scope="module")
def digits():
    return ne.data.load_dataset("digits")


@pytest.fixture(scope="module")
def batch(digits):
    x = torch.stack([digits.train[i][0] for i in range(64)])
    y = torch.stack([digits.train[i][1] for i in range(64)])
    return x, y


def trained(batch, residual: bool = False, steps: int = 5) -> torch.nn.Module:
    torch.manual_seed(0)
    model = ne.create_model("growable_cnn", num_classes=10, in_channels=1, channels=[4, 8, 8], blocks=[0, 0, 0],
                            residual=residual)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = batch
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def grow_width(model: torch.nn.Module, x: torch.Tensor) -> None:
    for name in [g.name for g in build_channel_graph(model, x[:1]).groups][:2]:
        widen_group(model, build_channel_graph(model, x[:1]).group(name), 3)


def grow_depth(model: torch.nn.Module, x: torch.Tensor) -> None:
    add_block(model, 1, calibration=x)
    add_block(model, 2, calibration=x)


@pytest.mark.parametrize("grow, residual", [(grow_width, False), (grow_depth, False), (grow_depth, True)])
@pytest.mark.parametrize("training", [True, False])
def test_the_level_inside_the_grown_model_is_the_old_model(batch, grow, residual, training):
    x, _ = batch
    model = trained(batch, residual)
    old = copy.deepcopy(model).train(training)
    level = NestedLevel(copy.deepcopy(model))
    grow(model, x)
    level.check(model)
    model.train(training)
    with torch.no_grad():
        expected = old(x)
        assert torch.equal(level(model, x), expected)
        if residual:  # a residual block with a zero last conv is the identity exactly, without calibration
            assert torch.equal(model(x), expected)
        # the level keeps its own statistics: the grown model's are untouched by the level's forward
        before = {k: v.clone() for k, v in model.named_buffers()}
        level(model, x)
        assert all(torch.equal(before[k], v) for k, v in model.named_buffers())


@pytest.mark.parametrize("grow", [grow_width, grow_depth])
def test_a_level_after_training_equals_its_export(batch, grow):
    x, y = batch
    model = trained(batch)
    level = NestedLevel(copy.deepcopy(model))
    grow(model, x)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        opt.zero_grad()
        nested_step(model, [level], x, y)
        opt.step()
    for training in (True, False):
        model.train(training)
        exported = level.export(model).train(training)
        with torch.no_grad():
            assert torch.allclose(level(model, x), exported(x), atol=1e-6)
    names = dict(model.named_parameters())
    for name, p in exported.named_parameters():  # the export's weights are the leading slices of the grown ones
        assert torch.equal(p, names[name][tuple(slice(0, n) for n in p.shape)]), name


@pytest.mark.parametrize("private_bn", [False, True])
@pytest.mark.parametrize("grow", [grow_width, grow_depth])
def test_the_level_loss_moves_exactly_the_shared_weights(batch, grow, private_bn):
    x, y = batch
    model = trained(batch)
    level = NestedLevel(copy.deepcopy(model), private_bn=private_bn)
    grow(model, x)
    own = level.own_parameters()
    assert bool(own) == private_bn and all(".bn." in n for n in own)

    def grads(levels):
        model.zero_grad()
        nested_step(model, levels, x, y, distill=0.5)
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    alone, joint = grads([]), grads([level])
    shapes = level.shapes
    changed_inside = False
    for name, g in joint.items():
        diff = (g - alone[name]).abs()
        if name not in shapes:  # a new block (the level skips it) or a BatchNorm the level has its own of
            assert diff.max() == 0, name
            continue
        inside = tuple(slice(0, n) for n in shapes[name])
        outside = torch.ones_like(diff, dtype=torch.bool)
        outside[inside] = False
        assert not diff[outside].any(), name  # new channels: the level does not use them
        changed_inside |= bool(diff[inside].max() > 0)
    assert changed_inside
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in own.values())


def test_a_level_not_nested_in_the_model_is_refused(batch):
    model = trained(batch)
    bigger = ne.create_model("growable_cnn", num_classes=10, in_channels=1, channels=[8, 8, 8], blocks=[0, 0, 0])
    with pytest.raises(ValueError, match="stages.0.entry.conv.weight"):
        NestedLevel(bigger).check(model)


def test_levels_are_chosen_in_turn():
    assert [choose_levels(3, s, 1) for s in range(4)] == [[0], [1], [2], [0]]
    assert choose_levels(3, 1, 2) == [0, 2]
    assert choose_levels(3, 5, None) == [0, 1, 2] and choose_levels(0, 5, 1) == []
    assert [choose_levels(4, s, 1, smallest=True) for s in range(4)] == [[0, 1], [0, 2], [0, 3], [0, 1]]
    assert choose_levels(1, 3, 1, smallest=True) == [0]


def grow_run(digits, out, residual=False, **kw):
    torch.manual_seed(0)
    model = ne.create_model("growable_cnn", num_classes=10, in_channels=1, channels=[4, 8, 8], blocks=[0, 0, 0],
                            residual=residual)
    settings = dict(threshold=0.0, check_every=10, warmup_steps=10, max_expansions=2, epochs=3, quiet=True, score_batch=64,
                    grow_until=0.5, history="nested", checkpoint_dir=out)
    settings.update(kw)
    eg = ne.ExpansionGrowth(**settings)
    return eg, eg.fit(model, digits.train, digits.val)


@pytest.mark.parametrize("candidates, history_bn, residual", [(["width"], "shared", False), (["depth", "width"], "shared", False),
                                                              (["depth", "width"], "private", False),
                                                              (["depth", "width"], "shared", True)])
def test_nested_checkpoints_hold_the_final_weights_and_load_as_before(digits, tmp_path, candidates, history_bn, residual):
    eg, result = grow_run(digits, tmp_path, candidates=candidates, history_bn=history_bn, residual=residual,
                          history_smallest=residual)
    res = result.details
    assert len(res.expansions) == 2 and len(res.checkpoints) == 3
    final = {name: p.detach().cpu() for name, p in res.model.named_parameters()}  # checkpoints load on the CPU
    for ckpt in res.checkpoints:
        model, meta = load_growth_checkpoint(ckpt.path)
        assert meta["step"] == ckpt.step == res.checkpoints[-1].step  # every level trained to the end
        assert evaluate(model, digits.val)["accuracy"] == pytest.approx(ckpt.accuracy)
        for name, p in model.named_parameters():
            if history_bn == "private" and ".bn." in name and ckpt is not res.checkpoints[-1]:
                continue  # the level's own BatchNorm weights
            assert torch.equal(p, final[name][tuple(slice(0, n) for n in p.shape)]), name
    assert [c.closed_at for c in res.checkpoints[:-1]] == [e["step"] for e in res.expansions]
    assert all(c.snapshot_accuracy is not None for c in res.checkpoints[:-1])
    # training the history levels costs compute: more MACs x samples than the same run without it
    _, plain = grow_run(digits, tmp_path / "plain", candidates=candidates, residual=residual, history="snapshot")
    assert [e["name"] for e in plain.details.expansions] == [e["name"] for e in res.expansions]
    assert result.compute["mac_samples"] > plain.compute["mac_samples"]


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("history_bn", ["shared", "private"])
def test_nested_resume_matches_the_uninterrupted_run(digits, tmp_path, history_bn):
    _, reference = grow_run(digits, tmp_path / "a", epochs=4, history_bn=history_bn)

    def stop(info):
        if info.index == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        grow_run(digits, tmp_path / "b", epochs=4, on_step_end=stop, history_bn=history_bn)
    model = ne.create_model("growable_cnn", num_classes=10, in_channels=1, channels=[4, 8, 8], blocks=[0, 0, 0])
    eg = ne.ExpansionGrowth(threshold=0.0, check_every=10, warmup_steps=10, max_expansions=2, epochs=4, quiet=True,
                            score_batch=64, grow_until=0.5, history="nested", history_bn=history_bn,
                            checkpoint_dir=tmp_path / "b")
    resumed = eg.fit(model, digits.train, digits.val, resume=True)
    ref, res = reference.details, resumed.details
    assert [e["name"] for e in res.expansions] == [e["name"] for e in ref.expansions]
    for key, value in ref.model.state_dict().items():
        assert torch.allclose(value.float(), res.model.state_dict()[key].float(), atol=1e-5), key
    for a, b in zip(ref.checkpoints, res.checkpoints):
        assert a.accuracy == pytest.approx(b.accuracy, abs=1e-3) and a.closed_at == b.closed_at
    assert resumed.compute["mac_samples"] == pytest.approx(reference.compute["mac_samples"])


def test_a_new_residual_block_is_trained_through_its_zero_conv(batch):
    x, y = batch
    model = trained(batch, residual=True)
    add_block(model, 1, calibration=x)
    block = model.stages[1].blocks[-1]
    assert float(block.conv2.weight.abs().max()) == 0 and float(block.bn.weight.min()) == 1.0  # BatchNorm left as built
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    assert float(block.conv2.weight.grad.abs().max()) > 0
    rebuilt = ne.create_model("growable_cnn", **model.nni_elastic_arch["kwargs"])
    rebuilt.load_state_dict(model.state_dict())  # the architecture record rebuilds it (checkpoints)
    assert rebuilt.block_counts == [0, 1, 0] and rebuilt.residual


def test_the_level_weight_scales_the_levels_gradient(batch):
    x, y = batch
    model = trained(batch, residual=True)
    level = NestedLevel(copy.deepcopy(model))
    grow_depth(model, x)

    def grads(levels, weight=1.0):
        model.zero_grad()
        nested_step(model, levels, x, y, weight=weight)
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    alone, full, half = grads([]), grads([level]), grads([level], weight=0.5)
    assert (full - alone).abs().max() > 0
    assert torch.allclose(half - alone, 0.5 * (full - alone), atol=1e-6)
