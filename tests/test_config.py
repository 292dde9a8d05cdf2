"""Recipes: every shipped recipe validates; bad recipes name the key, the value and the fix."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from nni_elastic.config import RecipeError, load_recipe, recipe_from_dict
from nni_elastic.runner import build_strategy

RECIPES = sorted(Path("strategies").glob("*/*.yaml"))


def test_recipes_ship_for_both_methods():
    methods = {p.parent.name for p in RECIPES}
    assert methods == {"prune_and_grow", "expansion_growth"}
    assert len(RECIPES) >= 10


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_shipped_recipe_validates_and_builds_its_strategy(path):
    recipe = load_recipe(path, check_paths=False)
    assert recipe.method == path.parent.name
    strategy = build_strategy(recipe)
    assert strategy.name == recipe.method


def write(tmp_path, data) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    "patch, fragment",
    [
        ({"strategy": {"grow_epoch": 1}}, "unknown recipe key 'strategy.grow_epoch'; did you mean 'grow_epochs'?"),
        ({"strategy": {"grow_epochs": "two"}}, "strategy.grow_epochs: 'two' has type str, expected int"),
        ({"strategy": {"grow_mode": "frozen"}}, "strategy.grow_mode: 'frozen' is not one of ['freeze', 'joint']"),
        ({"elastic": {"widths": [0.5, 0.25]}}, "elastic.widths: [0.5, 0.25] must be strictly increasing"),
        ({"elastic": {"widths": [0.0, 1.0]}}, "elastic.widths[0]: 0.0 must be a fraction in (0, 1]"),
        ({"elastic": {"widths": []}}, "elastic.widths: [] must be a non-empty list"),
        ({"train": {"lr": -0.1}}, "train.lr: -0.1 must be > 0"),
        ({"data": {"val_fraction": 1.5}}, "data.val_fraction: 1.5 must be in (0, 1)"),
        ({"method": "magic"}, "method: 'magic' is not one of"),
        ({"modle": {"name": "resnet20"}}, "unknown recipe key 'modle'; did you mean 'model'?"),
        ({"data": {"name": "cifar10", "root": "/no/such/cifar"}}, "data.root: directory '/no/such/cifar' does not exist"),
    ],
)
def test_bad_recipes_name_the_key_and_the_fix(tmp_path, patch, fragment):
    data = yaml.safe_load(Path("strategies/prune_and_grow/digits.yaml").read_text())
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key].update(value)
        else:
            data[key] = value
    with pytest.raises(RecipeError) as err:
        load_recipe(write(tmp_path, data))
    assert fragment in str(err.value)
    assert str(tmp_path / "recipe.yaml") in str(err.value)  # and the file it came from


def test_overrides_are_validated_like_the_file():
    recipe = load_recipe("strategies/prune_and_grow/digits.yaml", {"strategy.grow_epochs": "3", "data.limit": 100})
    assert recipe.strategy_section().grow_epochs == 3 and recipe.data.limit == 100
    with pytest.raises(RecipeError, match="strategy.threshold"):
        load_recipe("strategies/expansion_growth/digits.yaml", {"strategy.threshold": -1})


def test_missing_recipe_file_and_non_mapping(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_recipe(tmp_path / "nope.yaml")
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(RecipeError, match="must be a mapping"):
        load_recipe(path)
    with pytest.raises(RecipeError, match="strategy"):
        recipe_from_dict({"strategy": [1, 2]})
