"""Prune-and-grow's compute split: a long final joint step (``final_grow_epochs``) and path points (``path_samples``)."""
from __future__ import annotations

from unittest import mock

import pytest

import nni_elastic as ne
import nni_elastic.strategies.prune_and_grow as pg_module
from nni_elastic.config import RecipeError, load_recipe
from elastic_utils import digits_resnet20 as fresh_model

FAST = dict(widths=(0.25, 0.5, 1.0), pretrain_epochs=1, prune_steps=2, finetune_epochs=1, batch_size=32,
            calibrate_batches=2, quiet=True)


@pytest.fixture(scope="module")
def digits():
    return ne.data.load_dataset("digits", limit=300)


def spy_steps(pg: ne.PruneAndGrow, digits) -> list[tuple[tuple[int, ...], list[dict]]]:
    """Fit ``pg`` and return the (levels, extra points) of every joint training batch."""
    calls = []
    real = pg_module.elastic_step

    def spy(model, x, y, levels=None, extra=()):
        calls.append((tuple(levels), [dict(e) for e in extra]))
        return real(model, x, y, levels=levels, extra=extra)

    with mock.patch.object(pg_module, "elastic_step", spy):
        pg.fit(fresh_model(), digits.train, digits.val)
    return calls


def test_final_grow_epochs_trains_only_the_last_step(digits):
    pg = ne.PruneAndGrow(grow_epochs=0, final_grow_epochs=2, **FAST)
    calls = spy_steps(pg, digits)
    batches = -(-len(digits.train) // 32)
    assert calls and {levels for levels, _ in calls} == {(0, 1, 2)}  # the 0.5 grow step did not train
    assert len(calls) == 2 * batches
    assert pg.config()["final_grow_epochs"] == 2
    ratios = [lv.macs / pg.elastic_model_.levels[-1].macs for lv in pg.elastic_model_.levels]
    finetune = sum(r for r in ratios[:-1])  # one epoch at each pruned width (0.5 then 0.25)
    assert pg.compute_["full_epochs"] == pytest.approx(1 + finetune + 2 * sum(ratios))


def test_final_grow_epochs_defaults_to_grow_epochs(digits):
    pg = ne.PruneAndGrow(grow_epochs=1, **FAST)
    assert pg._grow_epochs(1, 3) == pg._grow_epochs(2, 3) == 1
    pg = ne.PruneAndGrow(grow_epochs=1, final_grow_epochs=0, **FAST)
    assert (pg._grow_epochs(1, 3), pg._grow_epochs(2, 3)) == (1, 0)


def test_core_epochs_trains_only_the_step_that_reaches_the_core(digits):
    epochs = []
    real = pg_module.train

    def spy(model, *args, desc="", **kw):
        if desc.startswith("prune"):
            epochs.append((desc, args[2].epochs))
        return real(model, *args, desc=desc, **kw)

    pg = ne.PruneAndGrow(grow_epochs=1, core_epochs=3, grow_mode="freeze", **{**FAST, "prune_steps": 3})
    with mock.patch.object(pg_module, "train", spy):
        pg.fit(fresh_model(), digits.train, digits.val)
    # 3 steps: an intermediate width, 0.5, then the core (0.25) with its own epochs
    assert [e for _, e in epochs] == [1, 1, 3] and epochs[-1][0] == "prune to 0.25"
    em = pg.elastic_model_
    full = em.levels[-1].macs
    above_core = sum(em.count(w)[0] / full for w in pg.prune_path()[:-1])
    ratios = [lv.macs / full for lv in em.levels]
    # pretraining, one epoch per step above the core, 3 at the core, one per grown level (freeze: that level alone)
    assert pg.compute_["full_epochs"] == pytest.approx(1 + above_core + 3 * ratios[0] + ratios[1] + ratios[2])
    assert pg.config()["core_epochs"] == 3 and pg._stale_levels(pg.elastic_model_) == []
    assert ne.PruneAndGrow(core_epochs=0, grow_mode="freeze", **FAST)._stale_levels(pg.elastic_model_) == [0]
    recipe = load_recipe("strategies/prune_and_grow/digits.yaml", overrides={"strategy.core_epochs": 5})
    assert recipe.strategy.core_epochs == 5
    with pytest.raises(RecipeError, match="core_epochs"):
        load_recipe("strategies/prune_and_grow/digits.yaml", overrides={"strategy.core_epochs": -1})


def test_freeze_mode_calibrates_a_last_level_that_never_trained():
    pg = ne.PruneAndGrow(grow_mode="freeze", grow_epochs=1, final_grow_epochs=0, **FAST)
    em = mock.Mock(num_levels=3, bn_mode="per_level", graph=mock.Mock(groups=[]), levels_=[mock.Mock(channels={"g": 1})])
    assert pg._stale_levels(em) == [2]


def test_path_points_are_nested_between_consecutive_levels_and_reproducible():
    chans = [{"a": 2, "b": 4}, {"a": 6, "b": 8}, {"a": 16, "b": 32}]
    first = pg_module._PathPoints(chans, 3, seed=7)
    points = [p for _ in range(50) for p in first()]
    assert len(points) == 150
    again = pg_module._PathPoints(chans, 3, seed=7)
    assert points == [p for _ in range(50) for p in again()]
    inside = 0
    for p in points:
        assert any(all(lo[g] <= p[g] <= hi[g] for g in p) for lo, hi in zip(chans, chans[1:])), p
        inside += p not in chans
    assert inside > 100  # mostly new configurations, not the levels themselves
    assert pg_module._PathPoints(chans[:1], 3, seed=0)() == []


def test_path_samples_train_points_between_levels_and_count_their_compute(digits):
    pg = ne.PruneAndGrow(grow_epochs=0, final_grow_epochs=1, path_samples=2, **FAST)
    calls = spy_steps(pg, digits)
    em = pg.elastic_model_
    chans = [lv.channels for lv in em.levels]
    assert calls and all(len(extra) == 2 for _, extra in calls)
    for _, extra in calls:
        for point in extra:
            c = em.channels_of(point)
            assert any(all(lo[g] <= c[g] <= hi[g] for g in c) for lo, hi in zip(chans, chans[1:]))
    plain = ne.PruneAndGrow(grow_epochs=0, final_grow_epochs=1, **FAST)
    assert all(extra == [] for _, extra in spy_steps(plain, digits))
    assert pg.compute_["full_epochs"] > plain.compute_["full_epochs"]
    assert pg.config()["path_samples"] == 2


def test_recipe_keys_and_their_errors(tmp_path):
    recipe = load_recipe("strategies/prune_and_grow/digits.yaml",
                         overrides={"strategy.final_grow_epochs": 4, "strategy.path_samples": 1})
    assert recipe.strategy.final_grow_epochs == 4 and recipe.strategy.path_samples == 1
    for key, bad in (("strategy.final_grow_epochs", -1), ("strategy.path_samples", -2)):
        with pytest.raises(RecipeError, match=key.split(".")[1]):
            load_recipe("strategies/prune_and_grow/digits.yaml", overrides={key: bad})
    with pytest.raises(ValueError, match="path_samples=-1"):
        ne.PruneAndGrow(path_samples=-1)


def test_resume_accepts_a_checkpoint_written_before_a_setting_existed():
    stored = {k: v for k, v in ne.PruneAndGrow(**FAST).config().items() if k != "core_epochs"}
    ne.PruneAndGrow(**FAST)._check_config(stored, "old.pt")  # core_epochs at its default (None): the same run
    with pytest.raises(ValueError, match="core_epochs: None -> 2"):
        ne.PruneAndGrow(core_epochs=2, **FAST)._check_config(stored, "old.pt")
    stored = {k: v for k, v in ne.PruneAndGrow(grow_mode="freeze", **FAST).config().items() if k != "final_grow_levels"}
    ne.PruneAndGrow(grow_mode="freeze", **FAST)._check_config(stored, "old.pt")  # written before it existed: 1
    with pytest.raises(ValueError, match=r"final_grow_levels: 1 -> 2\)"):
        ne.PruneAndGrow(grow_mode="freeze", final_grow_levels=2, **FAST)._check_config(stored, "old.pt")
