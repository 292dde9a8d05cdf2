"""Levels by budget: MACs or latency, per-group widths, nested, reported next to their budgets."""
from __future__ import annotations

import pytest
import torch

import nni_elastic as ne
from nni_elastic.budget import MacModel, parse_levels
from nni_elastic.config import RecipeError, load_recipe
from nni_elastic.measure import count_ops

RECIPE = "strategies/prune_and_grow/digits.yaml"


def nested(levels: list[dict[str, int]]) -> bool:
    return all(small[g] <= large[g] for small, large in zip(levels, levels[1:]) for g in small)


@pytest.fixture(scope="module")
def digits():
    return ne.data.load_dataset("digits", limit=300)


@pytest.fixture
def resnet(one_thread):
    """A fresh model per test (wrapping changes a model in place)."""
    torch.manual_seed(0)
    return ne.create_model("resnet20", num_classes=10, in_channels=1), torch.randn(1, 1, 16, 16)


# ---------------------------------------------------------------------- the budget spec
@pytest.mark.parametrize("spec, message", [
    ({"macs": [0.4, 0.1]}, "strictly increasing"),
    ({"macs": [0.1, 1.5]}, "must be in (0, 1]"),
    ({"macs": [0.1], "widths": [0.5]}, "exactly one of"),
    ({"flops": [0.1]}, "unknown key(s) ['flops']"),
    ({"macs": [0.1], "batch_size": 8}, "latency_ms budgets only"),
    ({"latency_ms": [2.0], "batch_size": 0}, "batch_size: 0"),
    ({"latency_ms": [2.0], "form": "fast"}, "form: 'fast'"),
    ({"macs": []}, "non-empty list"),
])
def test_bad_budgets_name_the_key(spec, message):
    with pytest.raises(ValueError, match="elastic.levels") as err:
        parse_levels(spec)
    assert message in str(err.value)


def test_budgets_function_and_recipe_form_agree():
    b = ne.budgets(latency_ms=[2, 5], batch_size=64)
    assert parse_levels(b.to_dict()) == b
    with pytest.raises(ValueError, match="exactly one of"):
        ne.budgets(macs=[0.5], widths=[0.5])


def test_recipe_and_search_space_keys_accept_budgets():
    # NNI and Optuna trials set dotted keys with YAML strings, as here
    recipe = load_recipe(RECIPE, {"elastic.levels.macs": "[0.1, 0.4, 1.0]"})
    assert recipe.elastic.levels == {"macs": [0.1, 0.4, 1.0]}
    assert ne.get_strategy("prune_and_grow").num_levels(recipe.strategy, recipe.elastic) == 3
    with pytest.raises(RecipeError, match=r"elastic.levels.macs: \[0.4, 0.1\] must be strictly increasing"):
        load_recipe(RECIPE, {"elastic.levels.macs": "[0.4, 0.1]"})


# ---------------------------------------------------------------------- allocation
def test_mac_model_matches_torch_pruning_counts(resnet):
    model, x = resnet
    plan = ne.allocate(model, x, ne.budgets(macs=[0.1, 0.3, 1.0]))
    em = ne.ElasticModel(model, x, levels=plan.levels, verify=False)
    macs = MacModel(em.model, em.graph, x)
    for level, exact in zip(plan.levels, plan.macs):
        # convolutions and linear layers are nearly all of a CNN's MACs; the exact count decides the fit
        assert macs(level) == pytest.approx(exact, rel=0.05)


@pytest.mark.parametrize("calibrate", [False, True], ids=["importance", "sensitivity"])
def test_macs_budgets_are_met_nested_and_per_group(resnet, calibrate):
    model, x = resnet
    before = {k: v.clone() for k, v in model.state_dict().items()}
    full = count_ops(model, x)[0]
    torch.manual_seed(1)
    batches = [(torch.randn(32, 1, 16, 16), torch.randint(0, 10, (32,)))] if calibrate else None
    budgets = [0.1, 0.25, 0.4, 1.0]
    plan = ne.allocate(model, x, ne.budgets(macs=budgets), calibration=batches)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model is not touched
    assert nested(plan.levels)
    for budget, ratio in zip(budgets, plan.macs_ratio):
        assert budget - 0.05 <= ratio <= budget + 1e-9  # within the budget, and using it
    # non-uniform: the groups of a level keep different fractions of their channels
    em = ne.ElasticModel(model, x, levels=plan.levels)  # the self-check passes: every level equals its export
    sizes = {g.name: g.size for g in em.graph.groups}
    fractions = {round(k / sizes[g], 2) for g, k in plan.levels[0].items()}
    assert len(fractions) > 1
    assert [lv.macs for lv in em.levels] == plan.macs
    assert plan.macs[-1] == full


def test_min_width_bounds_every_group(resnet):
    model, x = resnet
    plan = ne.allocate(model, x, ne.budgets(macs=[0.02, 1.0], min_width=0.25))
    em = ne.ElasticModel(model, x, levels=plan.levels, verify=False)
    for g in em.graph.groups:
        assert plan.levels[0][g.name] >= 0.25 * g.size
    assert plan.macs_ratio[0] > 0.02  # the floor wins over an unreachable budget (and a warning says so)


def test_latency_budgets_pick_the_largest_network_that_fits(resnet):
    model, x = resnet
    generous = ne.allocate(model, x, ne.budgets(latency_ms=[1e6], batch_size=2, form="sliced"))
    assert generous.macs_ratio == [1.0] and generous.latency_ms[0] is not None
    with pytest.raises(ValueError, match=r"latency_ms: 1e-06 ms is below the smallest network .* batch 2 in sliced form"):
        ne.allocate(model, x, ne.budgets(latency_ms=[1e-6], batch_size=2, form="sliced"))


# ---------------------------------------------------------------------- prune-and-grow with budgets
def test_prune_and_grow_builds_levels_from_macs_budgets(digits, one_thread):
    pg = ne.PruneAndGrow(levels=ne.budgets(macs=[0.1, 0.3, 1.0]), pretrain_epochs=0, prune_steps=3, finetune_epochs=1,
                         grow_epochs=0, batch_size=32, calibrate_batches=2, quiet=True)
    torch.manual_seed(0)
    model = ne.create_model("resnet20", num_classes=digits.num_classes, in_channels=1)
    result = pg.fit(model, digits.train, digits.val, example_inputs=digits.example_inputs())
    em = result.elastic_model
    assert [s.name for s in pg.plan()][:4] == ["wrap", "prune_1_of_3", "prune_2_of_3", "prune_3_of_3"]
    targets = pg.records_["prune_targets"]
    assert nested(targets[::-1]) and targets[-1] == em.levels[0].channels  # the last prune step is the core
    assert nested([lv.channels for lv in em.levels])
    rows = result.rows
    assert [r["budget"] for r in rows] == ["10.0% MACs", "30.0% MACs", "100.0% MACs"]
    for r, budget in zip(rows, (0.1, 0.3, 1.0)):
        assert r["macs_ratio"] <= budget + 1e-9 and r["width"] is None
    assert pg.records_["budget"]["macs_ratio"] == [r["macs_ratio"] for r in rows]


def test_budget_levels_survive_resume(digits, one_thread, tmp_path):
    settings = dict(levels={"macs": [0.15, 1.0]}, pretrain_epochs=0, prune_steps=2, finetune_epochs=1, grow_epochs=1,
                    batch_size=32, calibrate_batches=1, quiet=True, checkpoint_dir=tmp_path)

    class Stop(Exception):
        pass

    def stop_after_first_prune(info):
        if info.name == "prune_1_of_2":
            raise Stop

    torch.manual_seed(0)
    model = ne.create_model("resnet20", num_classes=digits.num_classes, in_channels=1)
    with pytest.raises(Stop):
        ne.PruneAndGrow(**settings, on_step_end=stop_after_first_prune).fit(
            model, digits.train, digits.val, example_inputs=digits.example_inputs())
    torch.manual_seed(0)
    fresh = ne.create_model("resnet20", num_classes=digits.num_classes, in_channels=1)
    pg = ne.PruneAndGrow(**settings)
    result = pg.fit(fresh, digits.train, digits.val, resume=True, example_inputs=digits.example_inputs())
    assert "prune_2_of_2" in pg.records_["steps"] and len(result.elastic_model.levels) == 2
    assert result.rows[0]["macs_ratio"] <= 0.15


def test_optuna_study_tunes_macs_budgets(tmp_path, one_thread):
    import optuna

    from nni_elastic.optuna import tune

    space = {"elastic.levels.macs": {"_type": "choice", "_value": ["[0.15, 1.0]", "[0.3, 1.0]"]}}
    tiny = {"device": "cpu", "data.limit": 150, "strategy.prune_steps": 1, "strategy.pretrain_epochs": 1,
            "strategy.finetune_epochs": 1, "strategy.grow_epochs": 1, "strategy.calibrate_batches": 2}
    study = tune(RECIPE, 2, search_space=space, storage=f"sqlite:///{tmp_path / 's.db'}", study_name="budgets",
                 overrides=tiny, output_dir=tmp_path / "out", quiet=True, seed=0, sampler="random", plots=False,
                 objectives=("accuracy", "macs"))
    for t in study.trials:
        assert t.state == optuna.trial.TrialState.COMPLETE
        budget = float(t.params["elastic.levels.macs"].strip("[]").split(",")[0])
        levels = t.user_attrs["level_macs"]
        assert len(levels) == 2 and levels[0] <= budget * levels[1]
