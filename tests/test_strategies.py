"""The strategy contract: a strategy from outside the package runs by name; recipes are validated against its options."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
import yaml

import nni_elastic as ne
from nni_elastic.config import RecipeError, load_recipe, recipe_from_dict
from nni_elastic.measure import budget, count_ops
from nni_elastic.options import option
from nni_elastic.reporting import summarize_levels
from nni_elastic.runner import build_strategy, run_recipe
from nni_elastic.training import evaluate, train

PLUGIN = '''
from dataclasses import dataclass, replace

import nni_elastic as ne
from nni_elastic.measure import count_ops
from nni_elastic.options import option
from nni_elastic.training import evaluate, train


@dataclass
class OneShotOptions:
    """Settings of the one-shot strategy (its recipe ``strategy:`` section)."""

    epochs: int = option(1, ge=0)


@ne.register_strategy("one_shot")
class OneShot(ne.Strategy):
    """Train the model as it is: one level."""

    Options = OneShotOptions

    def fit(self, model, train_data, val_data, *, resume=False, example_inputs=None):
        train(model, train_data, val_data, replace(self.train, epochs=self.options.epochs), device=self.device,
              quiet=self.quiet)
        macs, params = count_ops(model, example_inputs)
        accuracy = evaluate(model, val_data, device=self.device)["accuracy"]
        return ne.StrategyResult(model=model, rows=[{"level": 0, "width": 1.0, "macs": macs, "params": params,
                                                     "accuracy": accuracy}])
'''

TINY = {"model": {"name": "growable_cnn", "kwargs": {"channels": [4, 8, 8], "blocks": [0, 0, 0]}},
        "data": {"name": "digits", "limit": 200}, "device": "cpu"}


@dataclass
class InlineOptions:
    epochs: int = option(1, ge=0)
    mode: str = option("plain", choices=("plain", "twice"))


@ne.register_strategy("test_inline")
class Inline(ne.Strategy):
    """Registered from this test file, through the Python API."""

    Options = InlineOptions

    def fit(self, model, train_data, val_data, *, resume=False, example_inputs=None) -> ne.StrategyResult:
        epochs = self.options.epochs * (2 if self.options.mode == "twice" else 1)
        train(model, train_data, val_data, replace(self.train, epochs=epochs), device=self.device, quiet=True)
        macs, params = count_ops(model, example_inputs)
        acc = evaluate(model, val_data, device=self.device)["accuracy"]
        return ne.StrategyResult(model=model, rows=[{"level": 0, "width": 1.0, "macs": macs, "params": params,
                                                     "accuracy": acc}], records={"epochs_run": epochs})


def cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nni_elastic.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_a_strategy_from_outside_the_package_runs_with_nni_elastic_run(tmp_path: Path) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "ne_test_plugin.py").write_text(textwrap.dedent(PLUGIN))
    recipe = tmp_path / "one_shot.yaml"
    recipe.write_text(yaml.safe_dump({"method": "one_shot", "plugins": ["ne_test_plugin"], **TINY,
                                      "strategy": {"epochs": 1}, "output": str(tmp_path / "out")}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugins), os.environ.get("PYTHONPATH", "")])}
    proc = cli("run", str(recipe), "--quiet", env=env)
    assert proc.returncode == 0, proc.stderr
    table = json.loads((tmp_path / "out" / "levels.json").read_text())
    assert table["method"] == "one_shot" and len(table["levels"]) == 1 and table["levels"][0]["accuracy"] > 0
    assert yaml.safe_load((tmp_path / "out" / "recipe.yaml").read_text())["plugins"] == ["ne_test_plugin"]
    # its strategy: section is checked against its own options, with the usual messages
    bad = cli("run", str(recipe), "--set", "strategy.epoch=2", env=env)
    assert bad.returncode == 2 and "unknown recipe key 'strategy.epoch'; did you mean 'epochs'?" in bad.stderr
    # without the plugin on the path: one line naming the module
    missing = cli("run", str(recipe), env=dict(os.environ))  # the path as it was, without the plugins folder
    assert missing.returncode == 2 and "plugins[0]: cannot import 'ne_test_plugin'" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_a_strategy_registered_in_python_runs_through_the_recipe_runner(tmp_path: Path) -> None:
    assert {"prune_and_grow", "expansion_growth", "test_inline"} <= set(ne.list_strategies())
    recipe = recipe_from_dict({"method": "test_inline", **TINY, "strategy": {"mode": "twice"}})
    assert isinstance(recipe.strategy, InlineOptions) and recipe.strategy.mode == "twice"
    strategy = build_strategy(recipe)
    assert isinstance(strategy, Inline) and strategy.name == "test_inline" and strategy.train.seed == recipe.seed
    result = run_recipe(recipe, output=tmp_path / "run", quiet=True)
    assert result.elastic_model is None and len(result.rows) == 1 and result.records == {"epochs_run": 2}
    assert json.loads((tmp_path / "run" / "levels.json").read_text())["epochs_run"] == 2
    with pytest.raises(RecipeError, match=r"strategy.mode: 'thrice' is not one of \['plain', 'twice'\]"):
        recipe_from_dict({"method": "test_inline", "strategy": {"mode": "thrice"}})
    with pytest.raises(RecipeError, match="method: 'test_inlin' is not one of"):
        recipe_from_dict({"method": "test_inlin"})
    with pytest.raises(ValueError, match="already registered"):
        ne.register_strategy("test_inline")(Inline)


def test_training_settings_are_one_object_taken_whole() -> None:
    recipe = load_recipe("strategies/prune_and_grow/digits.yaml", {"train.lr": 0.1, "seed": 3})
    assert isinstance(recipe.train, ne.TrainConfig)
    pg = build_strategy(recipe)
    assert pg.train == replace(recipe.train, seed=3) and pg.config()["lr"] == 0.1 and pg.config()["seed"] == 3
    assert pg.config()["finetune_lr"] == pytest.approx(0.02)  # lr / 5 unless set
    direct = ne.PruneAndGrow(widths=(0.5, 1.0), train=ne.TrainConfig(lr=0.2, batch_size=32), grow_epochs=3)
    assert direct.train.lr == 0.2 and direct.options.grow_epochs == 3 and direct.widths == [0.5, 1.0]
    with pytest.raises(RecipeError, match="unknown recipe key 'train.epochs'"):
        load_recipe("strategies/prune_and_grow/digits.yaml", {"train.epochs": 3})
    with pytest.raises(TypeError, match="unexpected keyword argument 'grow_epoch'; did you mean 'grow_epochs'"):
        ne.PruneAndGrow(grow_epoch=3)


def test_expansion_growth_state_exists_before_fit_and_check_works_alone() -> None:
    eg = ne.ExpansionGrowth(threshold=0.0, candidates=["width"], quiet=True)
    assert eg.checks_ == [] and eg.expansions_ == [] and eg.checkpoints_ == []
    torch.manual_seed(0)
    model = ne.create_model("growable_cnn", in_channels=1, channels=[4, 8, 8], blocks=[0, 0, 0])
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    decision = eg.check(model, x, y)
    assert decision["best"] is not None and decision["expand"] and decision["candidates"]


def test_shared_tools() -> None:
    assert budget(None, 100, "max_macs") == float("inf")
    assert budget(0.5, 100, "max_macs") == 50 and budget(30, 100, "max_macs") == 30
    with pytest.raises(ValueError, match="max_macs=-1 must be a positive number"):
        budget(-1, 100, "max_macs")
    rows = [{"accuracy": 0.5, "macs": 10, "params": 4}, {"accuracy": 0.9, "macs": 40, "params": 16}]
    assert summarize_levels(rows, "smallest")["macs_ratio"] == 0.25 == summarize_levels(rows, 0)["macs_ratio"]
    assert summarize_levels(rows)["accuracy"] == pytest.approx(0.7)
    model = torch.nn.Conv2d(1, 4, 3)
    assert count_ops(model, torch.zeros(1, 1, 8, 8)) == (4 * 9 * 36 + 4 * 36, 40)
