"""Prune-and-grow's final BatchNorm calibration: freeze mode leaves every built level's outputs bit-identical."""
from __future__ import annotations

import pytest
import torch

import nni_elastic as ne

SMALL = dict(widths=(0.25, 0.5, 1.0), pretrain_epochs=0, prune_steps=2, finetune_epochs=1, grow_epochs=1,
             batch_size=32, calibrate_batches=2, quiet=True)


@pytest.fixture(scope="module")
def digits():
    return ne.data.load_dataset("digits", limit=160)


@torch.no_grad()
def level_output(em: ne.ElasticModel, level: int, x: torch.Tensor) -> torch.Tensor:
    modes = {m: m.training for m in em.modules()}
    em.eval()
    try:
        with em.use_level(level):
            return em(x.to(next(em.parameters()).device)).cpu()
    finally:
        for m, mode in modes.items():
            m.train(mode)


def run(digits, one_thread, **settings):
    """Fit, recording each level's eval output right after the step that built it (and before calibration)."""
    x = torch.stack([digits.val[i][0] for i in range(16)])
    built, before_calibration = {}, {}
    pg = ne.PruneAndGrow(**{**SMALL, **settings})

    def record(info):
        em = pg.elastic_model_
        if info.name.startswith("prune_") and info.index == max(i for i, s in enumerate(pg.plan()) if s.kind == "prune"):
            built[0] = level_output(em, 0, x)
        if info.name.startswith("grow_"):
            level = int(info.name.split("_")[1])
            built[level] = level_output(em, level, x)
        if info.name == pg.plan()[-2].name:  # the step before "calibrate"
            before_calibration.update({lv: level_output(em, lv, x) for lv in range(em.num_levels)})

    pg.on_step_end = record
    em = pg.fit(ne.create_model("resnet20", num_classes=10, in_channels=1), digits.train, digits.val).elastic_model
    final = {lv: level_output(em, lv, x) for lv in range(em.num_levels)}
    return pg, built, before_calibration, final


def test_freeze_mode_calibration_leaves_built_levels_bit_identical(digits, one_thread):
    torch.manual_seed(0)
    pg, built, before, final = run(digits, one_thread, grow_mode="freeze")
    assert sorted(built) == [0, 1, 2]
    for level in range(3):
        assert torch.equal(final[level], before[level]), level  # the calibration step changed nothing
        assert torch.equal(final[level], built[level]), level  # nor did any later step
    assert pg.records_["steps"]["calibrate"]["calibrated_levels"] == []


def test_freeze_mode_calibrates_levels_that_never_trained_alone(digits, one_thread):
    torch.manual_seed(0)
    pg, built, before, final = run(digits, one_thread, grow_mode="freeze", grow_epochs=0)
    assert pg.records_["steps"]["calibrate"]["calibrated_levels"] == [1, 2]
    assert torch.equal(final[0], built[0])  # the core trained alone in the last pruning step: untouched
    assert not torch.equal(final[2], before[2])


def test_joint_mode_calibrates_every_level(digits, one_thread):
    torch.manual_seed(0)
    pg, _, before, final = run(digits, one_thread, grow_mode="joint")
    assert pg.records_["steps"]["calibrate"]["calibrated_levels"] == [0, 1, 2]
    assert not torch.equal(final[0], before[0])


def test_final_grow_levels_trains_the_largest_levels_together_and_keeps_the_core(digits, one_thread):
    torch.manual_seed(0)
    pg, built, before, final = run(digits, one_thread, grow_mode="freeze", final_grow_levels=2)
    assert torch.equal(final[0], built[0])  # the core never trains again
    assert not torch.equal(final[1], built[1])  # level 1 trained again in the last step, with the full level
    for level in range(3):
        assert torch.equal(final[level], before[level]), level  # and the calibration left every level alone
    assert pg.records_["steps"]["calibrate"]["calibrated_levels"] == []
    em = pg.elastic_model_
    full = em.levels[-1].macs
    ratios = [lv.macs / full for lv in em.levels]
    # the last step ran levels 1 and 2 on every batch; the other grow step ran level 1 alone
    steps = pg.records_["compute_full_epochs"]
    plain = ne.PruneAndGrow(**{**SMALL, "grow_mode": "freeze"})
    assert pg.config()["final_grow_levels"] == 2 and plain.config()["final_grow_levels"] == 1
    assert steps == pytest.approx(sum(em.count(w)[0] / full for w in pg.prune_path()) + ratios[1] + ratios[1] + ratios[2])


def test_final_grow_levels_counts_the_level_it_trains_as_trained(digits):
    pg = ne.PruneAndGrow(**{**SMALL, "grow_mode": "freeze", "grow_epochs": 0, "final_grow_epochs": 1,
                            "final_grow_levels": 2})
    em = type("EM", (), {"num_levels": 3, "bn_mode": "per_level", "graph": type("G", (), {"groups": []})(),
                         "levels_": [type("L", (), {"channels": {"g": 1}})()]})()
    assert pg._stale_levels(em) == []
    assert ne.PruneAndGrow(**{**SMALL, "grow_mode": "freeze", "grow_epochs": 0, "final_grow_epochs": 1})._stale_levels(em) == [1]


@pytest.mark.parametrize("settings, message", [
    (dict(grow_mode="joint", final_grow_levels=2), r"final_grow_levels=2 needs grow_mode='freeze'"),
    (dict(grow_mode="freeze", final_grow_levels=3), r"final_grow_levels=3 must be at most 2, the number of levels above the core"),
    (dict(grow_mode="freeze", final_grow_levels=0), r"final_grow_levels"),
])
def test_final_grow_levels_errors_name_the_setting(settings, message):
    with pytest.raises(ValueError, match=message):
        ne.PruneAndGrow(**{**SMALL, **settings})
