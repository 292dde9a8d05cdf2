"""``ElasticModel.add_level``: extra nested levels on trained weights, each with its own calibrated BatchNorm
statistics, while every other level computes exactly what it did."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import nni_elastic as ne
from nni_elastic import ElasticModel
from nni_elastic.stages import stage_level

WIDTHS = (0.25, 0.5, 1.0)


@pytest.fixture(scope="module")
def digits():
    splits = ne.data.load_dataset("digits", limit=128)
    batches = [x for x, _ in ne.data.make_loader(splits.train, 32, shuffle=False)]
    return splits, batches


def build(digits, **kwargs) -> ElasticModel:
    """resnet20 on digits whose every level holds BatchNorm statistics of its own (train-mode forwards)."""
    splits, batches = digits
    torch.manual_seed(0)
    em = ElasticModel(ne.create_model("resnet20", num_classes=10, in_channels=1), splits.example_inputs(),
                      widths=WIDTHS, **kwargs)
    em.train()
    with torch.no_grad():
        for level in range(em.num_levels):
            with em.use_level(level):
                for x in batches[:2]:
                    em(x * (1 + level))
    return em.eval()


@torch.no_grad()
def out(em: ElasticModel, level, x: torch.Tensor) -> torch.Tensor:
    with em.use_level(level):
        return em.eval()(x)


def rows(em: ElasticModel) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in em.state_dict().items() if k.rsplit(".", 1)[-1].startswith("level_")}


def test_other_levels_stay_bit_identical(digits, one_thread):
    em = build(digits)
    x = digits[1][0]
    before = [out(em, i, x) for i in range(em.num_levels)]
    rows_before = rows(em)
    em.set_level(1)
    em.levels_[1].latency["cpu/b1/deploy"] = 1.5  # per-level caches move with their level
    level = em.add_level(0.375, data=digits[1])
    assert em.levels_[2].latency == {"cpu/b1/deploy": 1.5} and level.latency == {}
    assert level.index == 1 and level.width == 0.375 and [lv.index for lv in em.levels_] == [0, 1, 2, 3]
    assert [lv.width for lv in em.levels] == [0.25, 0.375, 0.5, 1.0]
    assert em.current_level == 2  # the active level (width 0.5) moved up with its index
    for old, new in ((0, 0), (1, 2), (2, 3)):
        assert torch.equal(out(em, new, x), before[old]), old
    for key, value in rows(em).items():  # one row more, at the new level's position; the others untouched
        assert value.shape[0] == rows_before[key].shape[0] + 1
        assert torch.equal(torch.cat([value[:1], value[2:]]), rows_before[key]), key


def test_added_level_has_its_own_calibrated_statistics(digits, one_thread):
    em = build(digits)
    x = digits[1][0]
    em.add_level(0.375, data=digits[1], batches=3)
    added = out(em, 1, x)
    assert not torch.equal(added, out(em, 2, x))
    mean = {k: v for k, v in rows(em).items() if k.endswith("level_running_mean")}
    assert any(not torch.equal(v[1], v[0]) and not torch.equal(v[1], v[2]) for v in mean.values())
    counts = [v[1] for k, v in rows(em).items() if k.endswith("level_num_batches_tracked")]
    assert all(int(c) == 3 for c in counts)
    # the same as calibrate_bn on the same batches, on the level and on an ad-hoc level of its channels
    saved = rows(em)
    em.calibrate_bn(digits[1], level=1, num_batches=3)
    assert all(torch.equal(v, saved[k]) for k, v in rows(em).items())
    with torch.no_grad(), em.use_level(0.375):  # an ad-hoc level of the same channels, in the spare slot
        em.calibrate_bn(digits[1], num_batches=3)
        assert em.current_level == em.channels_of(1)
        assert torch.equal(em(x), added)


def test_added_level_equals_its_export_and_is_counted(digits, one_thread):
    em = build(digits)
    x = digits[1][0]
    level = em.add_level({"layer2.0.conv1": 0.5, "layer3.0.conv1": 0.75}, data=digits[1])
    assert level.width is None and level.macs is not None and level.params is not None
    macs = [lv.macs for lv in em.levels]
    assert macs == sorted(macs) and len(set(macs)) == len(macs)
    em.verify()
    exported = em.export(level.index)
    assert torch.allclose(exported(x), out(em, level.index, x), rtol=1e-4, atol=1e-5)
    assert em.pick_level(max_macs=level.macs) == level.index
    assert [row["level"] for row in em.describe()] == list(range(em.num_levels))


def test_save_load_round_trip(digits, one_thread, tmp_path):
    em = build(digits)
    x = digits[1][0]
    em.add_level(0.375, data=digits[1])
    em.add_level({"channels": {**em.channels_of(0), "conv1": 1}}, data=digits[1])  # a count of 1 stays 1
    path = tmp_path / "elastic.pt"
    em.save(path)
    loaded = ElasticModel.load(path)
    assert [dataclasses.replace(lv, latency_ms=None) for lv in loaded.levels] == [
        dataclasses.replace(lv, latency_ms=None) for lv in em.levels
    ]
    assert loaded.levels_[0].channels["conv1"] == 1
    for level in range(em.num_levels):
        assert torch.equal(out(loaded, level, x), out(em, level, x)), level


def test_eight_levels_from_one_model(digits, one_thread):
    em = build(digits)
    x = digits[1][0]
    before = {w: out(em, i, x) for i, w in enumerate(WIDTHS)}
    for w in (0.75, 0.375, 0.625, 0.875, 0.3125):
        em.add_level(w, data=digits[1])
    assert em.num_levels == 8
    assert [lv.width for lv in em.levels] == [0.25, 0.3125, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0]
    for i, lv in enumerate(em.levels_):
        assert lv.index == i
        if lv.width in before:
            assert torch.equal(out(em, i, x), before[lv.width]), lv.width
    em.verify()


def test_subnet_search_results_become_levels(digits, one_thread):
    em = build(digits)
    widths = {"conv1": 0.5, "layer1": 0.5, "layer2": 0.75, "layer3": 0.5}
    row = {"widths": widths, "channels": em.channels_of(stage_level(em, widths)), "accuracy": 0.9}
    level = em.add_level(row, data=digits[1])
    assert level.channels == row["channels"]
    em.add_level({"widths": {"conv1": 0.5, "layer1": 0.5, "layer2": 0.75, "layer3": 0.75}})  # stage widths only

    class Subnet:  # as an NNI ElasticSubnet: a ``channels`` property
        channels = em.channels_of({g: 0.75 for g in em.graph.names})

    assert em.add_level(Subnet()).channels == Subnet.channels


def test_prepared_inference_forms_follow_the_levels(digits, one_thread):
    em = build(digits)
    x = digits[1][0]
    em.prepare_inference(memory_format="contiguous")
    before = [out(em, i, x) for i in range(em.num_levels)]
    em.add_level(0.375, data=digits[1])
    assert em.inference_memory()["levels"] == 4
    with torch.no_grad():
        for old, new in ((0, 0), (1, 2), (2, 3)):
            assert torch.allclose(out(em, new, x), before[old], rtol=1e-4, atol=1e-5)
        prepared = out(em, 1, x)
    with torch.enable_grad(), em.use_level(1):  # the ordinary sliced forward
        sliced = em(x).detach()
    assert torch.allclose(prepared, sliced, rtol=1e-4, atol=1e-5)


def test_ad_hoc_level_survives(digits, one_thread):
    em = build(digits)
    x = digits[1][0]
    adhoc = {g: 0.75 for g in em.graph.names}
    em.set_level(adhoc)
    em.calibrate_bn(digits[1])
    y = out(em, em.current_level, x)
    em.add_level(0.375, data=digits[1])
    assert em.current_level == em.channels_of(adhoc)
    with torch.no_grad():
        assert torch.equal(em(x), y)


def test_errors_leave_the_model_unchanged(digits, one_thread):
    em = build(digits)
    x = digits[1][0]
    before = [out(em, i, x) for i in range(em.num_levels)]
    with pytest.raises(ValueError, match=r"not nested with level 1: it keeps more channels of group 'conv1' \(12 > 8\)"):
        em.add_level({**{g: 0.5 for g in em.graph.names}, "conv1": 0.75, "layer1.0.conv1": 0.25})
    with pytest.raises(ValueError, match=r"level 1 already keeps exactly these channels"):
        em.add_level(0.5)
    with pytest.raises(ValueError, match=r"index=2: the new level nests at position 1"):
        em.add_level(0.375, index=2)
    with pytest.raises(ValueError, match=r"unknown channel group\(s\) \['nope'\]"):
        em.add_level({"nope": 0.5})
    with pytest.raises(ValueError, match=r"is not a level"):
        em.add_level("0.5")
    with pytest.raises(ValueError, match=r"calibrate_bn got no batches"):
        em.add_level(0.375, data=[])
    assert em.num_levels == 3 and all(torch.equal(out(em, i, x), before[i]) for i in range(3))
    assert all(v.shape[0] == 4 for v in rows(em).values())


def test_shared_statistics_refuse_calibration_data(digits, one_thread):
    em = build(digits, bn="shared")
    with pytest.raises(ValueError, match=r"bn='shared'"):
        em.add_level(0.375, data=digits[1])
    assert em.add_level(0.375).index == 1 and em.num_levels == 4
    em.verify()
