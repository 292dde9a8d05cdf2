"""Properties of ``ElasticModel``: nested levels, sliced == exported, costs, BN statistics, persistence.

Real torch-pruning on the zoo models with tiny inputs; expensive models are built once per module.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import re
import statistics
import time
from typing import Any

import pytest
import torch
import torch_pruning as tp
from torch import nn

from elastic_utils import NUM_CLASSES, TOL, ZOO, batch, perturb_bn, rel_diff
from nni_elastic import ElasticModel, create_model
from nni_elastic.data import load_dataset, make_loader
from nni_elastic.elastic import LevelLike

WIDTHS = (0.25, 0.5, 1.0)
CHANNELS = (1, 3)


def _populate_level_stats(em: ElasticModel, x: torch.Tensor, steps: int = 2) -> None:
    """Train-mode forwards at every level, so each level holds its own non-trivial BN statistics."""
    gen = torch.Generator().manual_seed(1)
    em.train()
    with torch.no_grad():
        for level in range(em.num_levels):
            with em.use_level(level):
                for _ in range(steps):
                    em(x + 0.3 * torch.randn(x.shape, generator=gen))
    em.eval()


def _build(
    name: str, in_channels: int = 3, widths: tuple[float, ...] = WIDTHS, **kwargs: Any
) -> tuple[ElasticModel, torch.Tensor]:
    """A zoo model with non-trivial BN statistics (shared and per level), wrapped."""
    torch.manual_seed(0)
    x = batch(in_channels)
    model = create_model(name, num_classes=NUM_CLASSES, in_channels=in_channels)
    perturb_bn(model, x)
    em = ElasticModel(model, x[:1], widths=widths, **kwargs)
    _populate_level_stats(em, x)
    return em, x


@pytest.fixture(scope="module")
def zoo() -> dict[tuple[str, int], tuple[ElasticModel, torch.Tensor]]:
    """Every zoo model on 1- and 3-channel inputs, wrapped once (tests set the level they need)."""
    return {(name, c): _build(name, c) for name in ZOO for c in CHANNELS}


@pytest.fixture(scope="module")
def exports(zoo) -> dict[tuple[str, int], list[nn.Module]]:
    return {key: [em.export(i) for i in range(em.num_levels)] for key, (em, _) in zoo.items()}


@torch.no_grad()
def _sliced(em: ElasticModel, level: LevelLike, x: torch.Tensor) -> torch.Tensor:
    with em.use_level(level):
        return em.eval()(x)


def _param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _linears(module: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in module.named_modules() if isinstance(m, nn.Linear)}


ZOO_KEYS = [(name, c) for name in ZOO for c in CHANNELS]
ZOO_IDS = [f"{name}-{c}ch" for name, c in ZOO_KEYS]


# --------------------------------------------------------------------------- function preservation


def _negated_l1(group: object) -> torch.Tensor:
    return -tp.importance.GroupMagnitudeImportance(p=1)(group)


IMPORTANCE_CASES = ["l1", "l2", "bn", "taylor", "random", _negated_l1]


@pytest.mark.parametrize("importance", IMPORTANCE_CASES, ids=lambda i: getattr(i, "__name__", i))
def test_wrapping_preserves_the_function(importance: object) -> None:
    torch.manual_seed(0)
    x = batch(3)
    model = create_model("resnet20", num_classes=NUM_CLASSES)
    perturb_bn(model, x)
    reference = copy.deepcopy(model).eval()
    data = [(x, torch.arange(len(x)) % NUM_CLASSES)]
    em = ElasticModel(model, x[:1], widths=WIDTHS, importance=importance, data=data)
    assert rel_diff(_sliced(em, -1, x), reference(x).detach()) <= TOL
    assert all(p.grad is None for p in em.parameters())  # ranking leaves no gradients behind


@pytest.mark.parametrize("name", ZOO)
def test_wrapping_preserves_the_function_of_every_zoo_model(name: str) -> None:
    torch.manual_seed(0)
    x = batch(3)
    model = create_model(name, num_classes=NUM_CLASSES)
    perturb_bn(model, x)
    reference = copy.deepcopy(model).eval()
    em = ElasticModel(model, x[:1], widths=WIDTHS)
    assert rel_diff(_sliced(em, -1, x), reference(x).detach()) <= TOL


# --------------------------------------------------------------------------- sliced == exported


@pytest.mark.parametrize("key", ZOO_KEYS, ids=ZOO_IDS)
def test_sliced_level_equals_exported_level(zoo, exports, key) -> None:
    em, x = zoo[key]
    outputs = []
    for level, exported in enumerate(exports[key]):
        sliced = _sliced(em, level, x)
        with torch.no_grad():
            plain = exported(x)
        assert sliced.shape == plain.shape == (len(x), NUM_CLASSES)  # the classifier never shrinks
        assert rel_diff(sliced, plain) <= TOL, f"level {level}"
        outputs.append(sliced)
    assert rel_diff(outputs[0], outputs[-1]) > 1e-3  # the levels really are different networks


@pytest.mark.parametrize("key", ZOO_KEYS, ids=ZOO_IDS)
def test_export_is_plain_pytorch_and_costs_grow_with_level(zoo, exports, key) -> None:
    em, _ = zoo[key]
    for exported in exports[key]:
        for name, m in exported.named_modules():
            assert not type(m).__module__.startswith("nni_elastic._slicing"), f"{name}: {type(m)}"
        assert not any("level_running" in name for name, _ in exported.named_buffers())
        assert not exported.training
        assert list(_linears(exported).values())[-1].out_features == NUM_CLASSES
    counts = [_param_count(e) for e in exports[key]]
    assert all(a < b for a, b in zip(counts, counts[1:]))
    levels = em.levels
    assert [lv.params for lv in levels] == counts  # the level table describes the exports
    assert all(a.macs < b.macs for a, b in zip(levels, levels[1:]))
    assert all(a.params < b.params for a, b in zip(levels, levels[1:]))


def _torchscript(module: nn.Module, x: torch.Tensor) -> torch.jit.ScriptModule:
    try:
        return torch.jit.script(module)
    except Exception:  # a model whose Python-only helpers TorchScript cannot compile: tracing works
        return torch.jit.trace(module, x)


@pytest.mark.parametrize("name", ZOO)
def test_export_is_scriptable(zoo, exports, name: str) -> None:
    _, x = zoo[name, 3]
    exported = exports[name, 3][0]
    scripted = _torchscript(exported, x[:1])
    with torch.no_grad():
        assert rel_diff(scripted(x), exported(x)) <= TOL


@pytest.mark.parametrize("name", ZOO)
def test_export_is_onnx_exportable(zoo, exports, name: str, tmp_path) -> None:
    onnx = pytest.importorskip("onnx")
    _, x = zoo[name, 3]
    path = tmp_path / f"{name}.onnx"
    torch.onnx.export(exports[name, 3][0], (x,), str(path))
    onnx.checker.check_model(str(path), full_check=True)
    proto = onnx.load(str(path))
    out_dims = proto.graph.output[0].type.tensor_type.shape.dim
    assert out_dims[-1].dim_value == NUM_CLASSES


def test_export_works_under_no_grad_and_inference_mode(zoo, exports) -> None:
    em, x = zoo["growable_cnn", 3]
    expected = [e(x).detach() for e in exports["growable_cnn", 3]]
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            for level, want in enumerate(expected):
                assert rel_diff(em.export(level)(x), want) <= TOL
            assert em.measure_latency(0, exported=True, repeats=2, warmup=1) > 0
    exported = em.export(0)  # the copy holds ordinary tensors: it can still be fine-tuned
    exported.train()(x).sum().backward()


# --------------------------------------------------------------------------- what shrinks, what does not


@pytest.mark.parametrize("name", ["vgg16_bn", "alexnet"])
def test_linear_hidden_layer_shrinks(zoo, exports, name: str) -> None:
    smallest, full = (_linears(e) for e in (exports[name, 3][0], exports[name, 3][-1]))
    *hidden, classifier = full
    assert hidden
    for path in hidden:
        assert smallest[path].out_features < full[path].out_features
    assert smallest[classifier].out_features == full[classifier].out_features == NUM_CLASSES


def test_ignored_layers_keep_full_width() -> None:
    ignored = ["layer2.0.conv1", "conv1"]  # a plain conv; the stem, which heads a residual group
    em, x = _build("resnet20", ignored_layers=ignored)
    reference = create_model("resnet20", num_classes=NUM_CLASSES)
    coupled = ["layer2.0.conv1", "conv1", "layer1.0.conv2", "layer1.2.conv2"]  # residual sum members
    for level in range(em.num_levels):
        exported = em.export(level)
        for path in coupled:
            assert exported.get_submodule(path).out_channels == reference.get_submodule(path).out_channels
        assert rel_diff(_sliced(em, level, x), exported(x).detach()) <= TOL
    free = "layer2.1.conv1"  # not ignored: still shrinks
    assert em.export(0).get_submodule(free).out_channels < reference.get_submodule(free).out_channels


def test_batchnorm_outside_elastic_groups_keeps_per_level_statistics() -> None:
    em, x = _build("resnet20", ignored_layers=["layer2.0.conv1"])  # its bn1 is in no elastic group
    full = _sliced(em, -1, x)
    em.train()
    with torch.no_grad(), em.use_level(0):
        em(x * 3 + 1)  # statistics far from the populated ones
    assert torch.equal(_sliced(em, -1, x), full)


# --------------------------------------------------------------------------- level switching


def _storage(em: ElasticModel) -> set[tuple[int, int]]:
    return {(id(t), t.data_ptr()) for t in (*em.parameters(), *em.buffers())}


def test_level_switch_allocates_no_parameters_and_is_fast(zoo) -> None:
    em, x = zoo["resnet20", 3]
    before = _storage(em)
    for level in [*range(em.num_levels), 0.6, {em.graph.names[0]: 0.5}, -1]:
        em.set_level(level)
        _sliced(em, level, x)
        assert _storage(em) == before
    n = 1000
    start = time.perf_counter()
    for i in range(n):
        em.set_level(i % em.num_levels)
    mean_ms = (time.perf_counter() - start) / n * 1000
    assert mean_ms < 1.0, f"set_level takes {mean_ms:.3f} ms on average"


def test_small_level_computes_less() -> None:
    """The sliced forward of a small level executes fewer FLOPs (counted, not timed: timings live in
    benchmarks/bench_elastic.py, where sliced and exported latency are measured side by side)."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    em = ElasticModel(create_model("resnet20", num_classes=NUM_CLASSES), torch.zeros(1, 3, 32, 32),
                      widths=(0.25, 0.5, 0.75, 1.0)).eval()
    x = torch.randn(2, 3, 32, 32)

    def flops(level: int) -> int:
        em.set_level(level)
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            em(x)
        return counter.get_total_flops()

    small, full = flops(0), flops(-1)
    assert small < 0.2 * full, f"level 0 executes {small} FLOPs, full {full}"  # ~1/16 at a quarter width
    # 2 FLOPs per MAC at batch 2; torch-pruning also counts BatchNorm and pooling, FlopCounterMode does not
    assert small == pytest.approx(2 * 2 * em.levels[0].macs, rel=0.1)


def test_ad_hoc_levels(zoo) -> None:
    em, x = zoo["resnet20", 3]
    em.set_level(1)
    half = {name: 0.5 for name in em.graph.names[::2]}  # groups not named stay at full width
    for level in (0.6, half):
        em.set_level(level)
        channels = em.channels_of(level)
        assert em.current_level == channels
        exported = em.export()
        assert exported.nni_elastic_channels == channels
        with torch.no_grad():
            sliced = em(x)
            assert rel_diff(sliced, exported(x)) <= TOL
            assert rel_diff(sliced, em.export(level)(x)) <= TOL
    assert channels == {g.name: (g.size // 2 if g.name in half else g.size) for g in em.graph.groups}
    assert all(exported.get_submodule(g).out_channels == k for g, k in channels.items())
    small, mid, full = (lv.macs for lv in em.levels)
    assert small < em.count(0.4)[0] < mid < em.count(0.75)[0] < full
    em.set_level(-1)


def test_ad_hoc_level_chosen_under_inference_mode_still_trains() -> None:
    em, x = _build("densenet_tiny")  # concatenations: index selectors, not prefixes
    with torch.inference_mode():
        em.measure_latency(0.6, repeats=1, warmup=0)
    em.set_level(0.6)
    em.train()(x).sum().backward()
    assert all(p.grad is not None for p in em.parameters())


def test_use_level_restores_the_previous_level(zoo) -> None:
    em, x = zoo["resnet20", 3]
    em.set_level(1)
    with pytest.raises(RuntimeError, match="boom"):
        with em.use_level(0):
            assert em.current_level == 0
            raise RuntimeError("boom")
    assert em.current_level == 1

    em.set_level(0.6)  # an ad-hoc level survives a nested ad-hoc level and an export of another
    before = _sliced(em, em.current_level, x)
    with em.use_level({em.graph.names[0]: 0.25}):
        pass
    em.export(0.3)
    assert em.current_level == em.channels_of(0.6)
    with torch.no_grad():
        assert torch.equal(em(x), before)
    em.set_level(-1)


# --------------------------------------------------------------------------- BatchNorm statistics


def _bn_rows(em: ElasticModel) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {
        name: (m.level_running_mean.clone(), m.level_num_batches_tracked.clone())
        for name, m in em.model.named_modules()
        if hasattr(m, "level_running_mean")
    }


def test_training_forward_updates_only_its_level_row() -> None:
    em, x = _build("resnet20")
    before = _bn_rows(em)
    assert before and all(mean.shape[0] > em.num_levels for mean, _ in before.values())  # + ad-hoc row
    full = _sliced(em, -1, x)
    em.train()
    with torch.no_grad(), em.use_level(0):
        em(x * 2 + 1)
    for name, (mean, count) in _bn_rows(em).items():
        assert not torch.equal(mean[0], before[name][0][0]), name
        assert torch.equal(mean[1:], before[name][0][1:]), name
        assert count[0] == before[name][1][0] + 1 and torch.equal(count[1:], before[name][1][1:])
    assert torch.equal(_sliced(em, -1, x), full)  # the other levels compute exactly what they did


def test_calibrate_bn_fills_the_level_row() -> None:
    splits = load_dataset("digits", limit=64)
    loader = make_loader(splits.train, 16, shuffle=False)
    torch.manual_seed(0)
    em = ElasticModel(create_model("growable_cnn", num_classes=splits.num_classes, in_channels=splits.in_channels),
                      splits.example_inputs(), widths=WIDTHS)
    em.train().set_level(2)
    before = _bn_rows(em)
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in before}
    hooks = [
        em.model.get_submodule(name).register_forward_hook(
            lambda m, inputs, out, name=name: seen[name].append(inputs[0].mean((0, 2, 3)))
        )
        for name in before
    ]
    em.calibrate_bn(loader, level=1, num_batches=3)
    for h in hooks:
        h.remove()
    assert em.current_level == 2 and em.training and all(m.training for m in em.modules())
    for name, (mean, count) in _bn_rows(em).items():
        k = len(seen[name][0])
        expected = torch.stack(seen[name]).mean(0)  # an exact average over the batches
        assert len(seen[name]) == 3 and count[1] == 3
        assert torch.allclose(mean[1, :k], expected, atol=1e-5), name
        keep = [r for r in range(mean.shape[0]) if r != 1]
        assert torch.equal(mean[keep], before[name][0][keep])


@pytest.mark.parametrize("bn", ["per_level", "shared"])
def test_shared_bn_reads_one_row_for_all_levels(bn: str) -> None:
    em, x = _build("growable_cnn", bn=bn)
    rows = {mean.shape[0] for mean, _ in _bn_rows(em).values()}
    assert rows == ({1} if bn == "shared" else {em.num_levels + 1})
    full = _sliced(em, -1, x)
    em.calibrate_bn([x * 2 + 1], level=0)
    changed = not torch.equal(_sliced(em, -1, x), full)
    assert changed == (bn == "shared")  # per-level statistics keep the full level untouched


# --------------------------------------------------------------------------- persistence


@pytest.mark.parametrize("name", ["resnet20", "mobilenetv2_tiny", "densenet_tiny"])
def test_save_load_round_trip(zoo, name: str, tmp_path) -> None:
    em, x = zoo[name, 3]
    path = tmp_path / "elastic.pt"
    em.save(path, note="round trip")
    assert os.listdir(tmp_path) == ["elastic.pt"]  # atomic: no temporary file left behind
    payload = torch.load(path, weights_only=True)
    assert payload["levels"]

    loaded = ElasticModel.load(path)
    assert loaded.metadata == {"note": "round trip"}
    assert loaded.graph.names == em.graph.names
    assert [dataclasses.replace(lv, latency_ms=None) for lv in loaded.levels] == [
        dataclasses.replace(lv, latency_ms=None) for lv in em.levels
    ]
    for level in range(em.num_levels):
        assert torch.equal(_sliced(loaded, level, x), _sliced(em, level, x))


def test_save_load_round_trip_with_single_channel_groups(tmp_path) -> None:
    em, x = _build("resnet20", widths=(0.05, 1.0))
    assert 1 in em.levels_[0].channels.values()  # a 16-channel group keeps 1 channel
    em.save(tmp_path / "tiny.pt")
    loaded = ElasticModel.load(tmp_path / "tiny.pt")
    assert [lv.channels for lv in loaded.levels_] == [lv.channels for lv in em.levels_]
    assert torch.equal(_sliced(loaded, 0, x), _sliced(em, 0, x))


class CustomCNN(nn.Module):
    """A model outside the registry (saved with its pickled module)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.head = nn.Linear(16, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.head(x.mean((2, 3)))


def test_custom_model_round_trips(tmp_path) -> None:
    torch.manual_seed(0)
    x = batch(3)
    model = CustomCNN()
    perturb_bn(model, x)
    em = ElasticModel(model, x[:1], widths=WIDTHS)
    _populate_level_stats(em, x)
    em.save(tmp_path / "custom.pt")  # weights only: the class is the user's
    em.save(tmp_path / "pickled.pt", pickle_model=True)  # opt-in: the module pickled as bytes
    torch.load(tmp_path / "pickled.pt", weights_only=True)  # the file itself holds no code
    with pytest.raises(ValueError, match=r"custom\.pt: the model is not from the nni-elastic zoo.*model="):
        ElasticModel.load(tmp_path / "custom.pt")
    with pytest.raises(ValueError, match=r"pickled\.pt: the model \(.*CustomCNN\) is stored pickled.*trust=True"):
        ElasticModel.load(tmp_path / "pickled.pt")  # never unpickles without trust
    unpickled = ElasticModel.load(tmp_path / "pickled.pt", trust=True)
    rebuilt = ElasticModel.load(tmp_path / "custom.pt", model=CustomCNN())  # never unpickles code
    for loaded in (unpickled, rebuilt):
        assert type(loaded.model).__name__ == "CustomCNN"
        assert [lv.channels for lv in loaded.levels_] == [lv.channels for lv in em.levels_]
        for level in range(em.num_levels):
            assert torch.equal(_sliced(loaded, level, x), _sliced(em, level, x))
    assert sorted(os.listdir(tmp_path)) == ["custom.pt", "pickled.pt"]


# --------------------------------------------------------------------------- pick_level


def test_pick_level_fits_the_budget(zoo) -> None:
    em, _ = zoo["resnet20", 3]
    macs = [lv.macs for lv in em.levels]
    full = macs[-1]
    for budget in (macs[0] / full, (macs[0] + macs[1]) / 2 / full, (macs[1] + macs[2]) / 2 / full, 1.0):
        expected = max(i for i, m in enumerate(macs) if m <= budget * full)
        assert em.pick_level(max_macs=budget) == expected
    assert em.pick_level(max_macs=macs[1]) == 1  # an absolute count
    with pytest.raises(ValueError, match=rf"no level fits.*{macs[0]} MACs"):
        em.pick_level(max_macs=macs[0] / full / 2)
    with pytest.raises(ValueError, match="at least one budget"):
        em.pick_level()


def test_pick_level_by_latency() -> None:
    em, _ = _build("growable_cnn")
    assert em.pick_level(max_latency_ms=60_000.0) == em.num_levels - 1
    assert all(lv.latency_ms is not None and lv.latency_ms > 0 for lv in em.levels)


# --------------------------------------------------------------------------- errors


def test_unknown_model_name() -> None:
    with pytest.raises(ValueError, match=r"'no_such_net'.*resnet20"):
        create_model("no_such_net")


@pytest.fixture(scope="module")
def small() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return create_model("growable_cnn", num_classes=NUM_CLASSES), batch(3)


@pytest.mark.parametrize("width", [0.0, 1.5, -0.1])
def test_width_outside_unit_interval(small, width: float) -> None:
    model, x = small
    with pytest.raises(ValueError, match=rf"width {re.escape(repr(width))} is outside \(0, 1\]"):
        ElasticModel(copy.deepcopy(model), x[:1], widths=(width, 1.0))


def test_empty_widths(small) -> None:
    with pytest.raises(ValueError, match=r"widths must not be empty.*e\.g\."):
        ElasticModel(copy.deepcopy(small[0]), small[1][:1], widths=())


@pytest.mark.parametrize("widths", [(0.5, 0.5), (0.75, 0.25)])
def test_non_increasing_widths(small, widths) -> None:
    with pytest.raises(ValueError, match=rf"strictly increasing.*{re.escape(str(list(widths)))}"):
        ElasticModel(copy.deepcopy(small[0]), small[1][:1], widths=widths)


def test_unknown_group_in_levels(small) -> None:
    model, x = small
    with pytest.raises(ValueError, match=r"levels\[0\].*'no_such_group'.*groups of this model: \[.*stages") as info:
        ElasticModel(copy.deepcopy(model), x[:1], levels=[{"no_such_group": 0.5}])
    assert "stages.0.entry.conv" in str(info.value)


def test_levels_must_be_nested(small) -> None:
    model, x = small
    group = "stages.0.entry.conv"
    with pytest.raises(ValueError, match=rf"nested: levels\[1\] keeps 4 channels of group '{re.escape(group)}'"):
        ElasticModel(copy.deepcopy(model), x[:1], levels=[{group: 0.5}, {group: 0.25}])


def test_unknown_importance(small) -> None:
    with pytest.raises(ValueError, match=r"'no_such_criterion'.*l1.*taylor"):
        ElasticModel(copy.deepcopy(small[0]), small[1][:1], importance="no_such_criterion")


def test_gradient_importance_needs_data(small) -> None:
    with pytest.raises(ValueError, match=r"'taylor' needs gradients: pass data="):
        ElasticModel(copy.deepcopy(small[0]), small[1][:1], importance="taylor")


def test_level_out_of_range(zoo) -> None:
    em, _ = zoo["growable_cnn", 3]
    for bad in (em.num_levels, -em.num_levels - 1):
        with pytest.raises(ValueError, match=rf"level {bad} does not exist.*0\.\.{em.num_levels - 1}"):
            em.set_level(bad)
    with pytest.raises(ValueError, match="does not exist"):
        em.export(em.num_levels + 3)
    with pytest.raises(ValueError, match="True"):
        em.set_level(True)
    em.set_level(-1)


def test_missing_data_directory(tmp_path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_dataset("fashion_mnist", root=missing)


def test_wrapping_twice_is_refused(zoo) -> None:
    em, x = zoo["growable_cnn", 3]
    with pytest.raises(ValueError, match="already inside an ElasticModel"):
        ElasticModel(em.model, x[:1])


# --------------------------------------------------------------------------- devices


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sliced_equals_exported_on_cuda() -> None:
    em, x = _build("resnet20")
    em.to("cuda")
    x = x.cuda()
    for level in range(em.num_levels):
        exported = em.export(level)
        assert next(exported.parameters()).is_cuda
        with torch.no_grad():
            assert rel_diff(_sliced(em, level, x), exported(x)) <= TOL
    em.set_level(0.6)
    with torch.no_grad():
        assert rel_diff(em(x), em.export()(x)) <= TOL


def test_evaluation_runs_where_the_model_is_and_auto_falls_back_to_the_default() -> None:
    from nni_elastic.device import module_device, run_device, resolve_device
    from nni_elastic.training import evaluate
    data = load_dataset("digits", limit=64).val
    model = create_model("resnet20", num_classes=10, in_channels=1)
    assert module_device(model) == torch.device("cpu") and module_device(nn.ReLU()) is None
    assert run_device(model) == torch.device("cpu")  # a CPU model is evaluated on the CPU, CUDA or not
    assert run_device(nn.ReLU()) == resolve_device("auto")
    assert run_device(model.to("meta")) == resolve_device("auto")
    assert 0 <= evaluate(create_model("resnet20", num_classes=10, in_channels=1), data)["accuracy"] <= 1
    from nni_elastic.training import predictions
    logits = predictions(create_model("resnet20", num_classes=10, in_channels=1), data, device="cpu")
    assert logits.shape == (len(data), 10) and not logits.requires_grad  # no autograd graph kept


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_model_traces_with_cpu_example_inputs_and_a_cpu_model_evaluates_on_a_cuda_machine() -> None:
    from nni_elastic.training import evaluate
    data = load_dataset("digits", limit=64).val
    cpu = create_model("resnet20", num_classes=10, in_channels=1)
    on_cpu = evaluate(cpu, data)
    assert next(cpu.parameters()).device.type == "cpu"  # evaluated where it is, not moved
    em = ElasticModel(copy.deepcopy(cpu).cuda(), torch.zeros(1, 1, 8, 8), widths=(0.5, 1.0))  # a CPU batch
    assert next(em.parameters()).is_cuda and em.num_levels == 2
    with em.use_level(-1):
        assert evaluate(em, data)["accuracy"] == pytest.approx(on_cpu["accuracy"], abs=0.05)


def test_a_channel_count_of_one_is_one_channel_and_channels_of_round_trips() -> None:
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 8, 3, padding=1),
                        nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    em = ElasticModel(net, torch.zeros(1, 1, 8, 8), widths=(0.25, 1.0))
    first, second = em.graph.names[1], em.graph.names[0]  # groups of 4 and 8 channels
    assert em.channels_of(0) == {second: 2, first: 1}
    for level in range(em.num_levels):
        assert em.channels_of(em.channels_of(level)) == em.channels_of(level)  # an int is a channel count
    assert em.channels_of({first: 1, second: 1.0}) == {first: 1, second: 8}  # 1.0 is the whole group
    with pytest.raises(ValueError, match=r"5 channels requested, the group has 1..4"):
        em.channels_of({first: 5})
