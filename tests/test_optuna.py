"""Optuna adapter: search-space translation, tuning studies on real storages, subnet search, CLI, errors."""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import uuid
import warnings
from pathlib import Path

import optuna
import pytest
import torch

import nni_elastic as ne
from nni_elastic.config import RecipeError, load_recipe
from nni_elastic.optuna import (
    SearchSpaceError,
    check_params,
    find_search_space,
    load_search_space,
    open_storage,
    search_subnets,
    stage_groups,
    suggest,
    to_distributions,
    tune,
)
from nni_elastic.optuna._space import default_search_space
from nni_elastic.optuna.cli import add_parser

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "strategies" / "prune_and_grow" / "digits.yaml"
SPACES = sorted((ROOT / "search_spaces").glob("*.json"))
# one trial in ~2 s on a CPU core: two levels, one pruning step, tiny epochs
TINY = {"device": "cpu", "data.limit": 150, "elastic.widths": [0.5, 1.0], "strategy.prune_steps": 1,
        "strategy.pretrain_epochs": 1, "strategy.finetune_epochs": 1, "strategy.grow_epochs": 1,
        "strategy.calibrate_batches": 2}
# the same, but level widths stay in the search (so MACs vary) with four levels and three steps
TINY_WIDTHS = {k: v for k, v in TINY.items() if k != "elastic.widths"} | {"strategy.prune_steps": 3}
DONE = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def sqlite_url(tmp_path: Path, name: str = "study.db") -> str:
    return f"sqlite:///{tmp_path / name}"  # an absolute path gives sqlite:////...


def journal_url(tmp_path: Path, name: str = "study.log") -> str:
    return f"journal:///{tmp_path / name}"


def load(url: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=open_storage(url, heartbeat_interval=None))


def snapshot(study: optuna.Study) -> list[tuple]:
    return [(t.number, t.state, t.values, t.params, t.user_attrs) for t in study.trials]


def dominates(a: list[float], b: list[float], directions: list[str]) -> bool:
    """a dominates b: no worse in every objective, better in one."""
    signs = [1 if d == "maximize" else -1 for d in directions]
    no_worse = all(s * x >= s * y for s, x, y in zip(signs, a, b))
    return no_worse and any(s * x > s * y for s, x, y in zip(signs, a, b))


# ---------------------------------------------------------------------- search spaces
@pytest.mark.parametrize("path", SPACES, ids=[p.name for p in SPACES])
def test_shipped_space_translates_both_ways(path):
    from nni.common.hpo_utils.validation import validate_search_space

    raw = json.loads(path.read_text())
    assert validate_search_space(raw, raise_exception=True)  # NNI itself accepts the file
    dists = to_distributions(path)
    assert set(dists) == set(raw)
    for key, spec in raw.items():
        kind, args, d = spec["_type"], spec["_value"], dists[key]
        if kind == "choice":
            assert isinstance(d, optuna.distributions.CategoricalDistribution) and list(d.choices) == args
        elif kind == "randint":  # NNI's upper bound is exclusive, Optuna's inclusive
            assert isinstance(d, optuna.distributions.IntDistribution) and (d.low, d.high) == (args[0], args[1] - 1)
        else:
            assert isinstance(d, optuna.distributions.FloatDistribution) and (d.low, d.high) == (args[0], args[1])
            assert d.log == (kind == "loguniform")
            assert d.step == (args[2] if kind == "quniform" else None)
    # values Optuna samples are valid NNI values (random and TPE samplers)
    for sampler in (optuna.samplers.RandomSampler(seed=0), optuna.samplers.TPESampler(seed=0, n_startup_trials=5)):
        study = optuna.create_study(sampler=sampler)
        for _ in range(15):
            trial = study.ask()
            params = suggest(trial, path)
            check_params(path, params)
            study.tell(trial, float(len(str(params))))
            if path.name.startswith("prune_and_grow_"):  # and they are recipe overrides the recipe accepts
                recipe = RECIPE.parent / (path.stem[len("prune_and_grow_"):] + ".yaml")
                load_recipe(recipe, params, check_paths=False)


def test_every_tuning_space_is_found_by_the_recipe_convention():
    tuned = [p for p in SPACES if p.name.startswith("prune_and_grow_")]
    assert len(tuned) >= 5
    for path in tuned:
        recipe = RECIPE.parent / (path.stem[len("prune_and_grow_"):] + ".yaml")
        assert recipe.is_file(), recipe
        name = default_search_space("prune_and_grow", recipe.stem)
        assert find_search_space(name, near=recipe.parent) == path


@pytest.mark.parametrize("model, space", [("resnet20", "subnet_search.json"), ("resnet56", "subnet_search_thesis.json"),
                                          ("vgg16_bn", "subnet_search_vgg16.json")])
def test_subnet_spaces_map_stages_to_channel_groups(model, space):
    em = ne.ElasticModel(ne.create_model(model, num_classes=10, in_channels=3), torch.randn(1, 3, 32, 32), widths=(0.5, 1.0))
    groups = stage_groups(em, load_search_space(ROOT / "search_spaces" / space))
    assert all(groups.values())
    assert len({g for gs in groups.values() for g in gs}) == sum(len(gs) for gs in groups.values())  # each group once


@pytest.mark.parametrize("spec, words", [
    ({"a": {"_type": "choice", "_value": [{"_name": "x"}]}}, ["'a'", "nested choice"]),
    ({"b": {"_type": "normal", "_value": [0, 1]}}, ["'b'", "normal", "unbounded"]),
    ({"c": {"_type": "qloguniform", "_value": [1, 10, 1]}}, ["'c'", "qloguniform"]),
    ({"d": {"_type": "randint", "_value": [3, 3]}}, ["'d'", "exclusive"]),
    ({"e": {"_type": "quniform", "_value": [0.85, 0.99, 0.1]}}, ["'e'", "multiples of q"]),
    ({"f": {"_type": "gaussian", "_value": [1, 2]}}, ["'f'", "unknown type"]),
    ({"g": {"_type": "choice", "_value": [[0.5, 1.0]]}}, ["'g'", "YAML string"]),
    ({}, ["empty"]),
])
def test_untranslatable_spaces_are_errors_naming_the_key(spec, words):
    with pytest.raises(SearchSpaceError) as err:
        to_distributions(spec)
    for word in words:
        assert word in str(err.value)


def test_check_params_rejects_values_nni_cannot_produce():
    space = {"n": {"_type": "randint", "_value": [1, 4]}, "q": {"_type": "quniform", "_value": [0.8, 0.95, 0.05]}}
    check_params(space, {"n": 3, "q": 0.8500000000000001})
    for bad in ({"n": 4, "q": 0.85}, {"n": 2, "q": 0.87}, {"n": 2.0, "q": 0.85}):
        with pytest.raises(SearchSpaceError):
            check_params(space, bad)


# ---------------------------------------------------------------------- tuning studies
def test_tune_on_sqlite_then_resume_adds_trials_and_keeps_the_first(tmp_path):
    url, out = sqlite_url(tmp_path), tmp_path / "out"
    study = tune(RECIPE, 3, storage=url, study_name="resume", overrides=TINY, output_dir=out, quiet=True, seed=0)
    assert len(study.trials) == 3
    first = snapshot(load(url, "resume"))
    for t in study.trials:
        assert t.state == optuna.trial.TrialState.COMPLETE
        assert t.intermediate_values  # single objective: accuracy reported after each step
        a = t.user_attrs
        assert {"macs", "params", "level_accuracy", "level_macs", "checkpoint", "widths"} <= set(a)
        assert len(a["level_accuracy"]) == 2 and Path(a["checkpoint"]).is_file()
        assert t.value == pytest.approx(sum(a["level_accuracy"]) / 2)  # metric="mean"
    assert (out / "plots" / "history.png").is_file()
    study = tune(RECIPE, 2, storage=url, study_name="resume", overrides=TINY, output_dir=out, quiet=True, seed=0)
    assert len(study.trials) == 5 and [t.number for t in study.trials] == list(range(5))
    assert snapshot(load(url, "resume"))[:3] == first
    assert all(t.state in DONE and t.intermediate_values for t in study.trials)
    with pytest.raises(ValueError, match="objectives"):  # the stored study cannot change its objectives
        tune(RECIPE, 1, storage=url, study_name="resume", overrides=TINY, objectives=("accuracy", "macs"), quiet=True)


def _wait_for(predicate, timeout: float = 120.0, step: float = 0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise TimeoutError("condition not met in time")


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_a_killed_trial_does_not_corrupt_the_study(tmp_path, kind):
    url = sqlite_url(tmp_path) if kind == "sqlite" else journal_url(tmp_path)
    slow = TINY | {"data.limit": 400, "strategy.pretrain_epochs": 12}  # ~3 s per trial: time to kill one mid-run
    code = (f"from nni_elastic.optuna import tune\n"
            f"tune({str(RECIPE)!r}, 3, storage={url!r}, study_name='killed', overrides={slow!r}, "
            f"output_dir={str(tmp_path / 'out')!r}, quiet=True, plots=False, heartbeat_interval=1, grace_period=2)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "OMP_NUM_THREADS": "1"})

    def second_trial_running():
        try:
            trials = load(url, "killed").trials
        except KeyError:  # the study does not exist yet
            return None
        states = [t.state for t in trials]
        return states[:2] == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING]

    try:
        _wait_for(second_trial_running)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    study = load(url, "killed")  # reopening works
    # Optuna cannot learn of a SIGKILL: the trial stays RUNNING, the finished one is intact
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING]
    finished = snapshot(study)[:1]
    assert Path(study.trials[0].user_attrs["checkpoint"]).is_file()
    if kind == "sqlite":  # heartbeat: once the grace period passed, the next run marks it FAIL
        time.sleep(4)  # > grace_period, with SQLite's one-second timestamps
        tune(RECIPE, 1, storage=url, study_name="killed", overrides=TINY, output_dir=tmp_path / "out", quiet=True,
             plots=False, heartbeat_interval=1, grace_period=2)
    else:  # journal files have no heartbeat: fail_running marks it
        tune(RECIPE, 1, storage=url, study_name="killed", overrides=TINY, output_dir=tmp_path / "out", quiet=True,
             plots=False, fail_running=True)
    study = load(url, "killed")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL,
                                               optuna.trial.TrialState.COMPLETE]
    assert snapshot(study)[:1] == finished


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_two_workers_on_one_storage_run_exactly_n_trials(tmp_path, kind):
    url = sqlite_url(tmp_path) if kind == "sqlite" else journal_url(tmp_path)
    study = tune(RECIPE, 4, storage=url, study_name="workers", workers=2, overrides=TINY, output_dir=tmp_path / "out",
                 quiet=True, plots=False, seed=0)
    trials = load(url, "workers").trials
    assert len(trials) == 4 and sorted(t.number for t in trials) == [0, 1, 2, 3]
    assert len({t._trial_id for t in trials}) == 4
    assert all(t.state in DONE for t in trials)
    assert len({t.user_attrs["output"] for t in trials}) == 4
    assert len(study.trials) == 4


def test_multi_objective_returns_a_non_dominated_pareto_front(tmp_path):
    study = tune(RECIPE, 4, storage=journal_url(tmp_path), study_name="pareto", objectives=("accuracy", "macs"),
                 overrides=TINY_WIDTHS, output_dir=tmp_path / "out", quiet=True, seed=1)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    front = study.best_trials
    assert front and len(done) == 4
    dirs = ["maximize", "minimize"]
    for f in front:
        assert not any(dominates(t.values, f.values, dirs) for t in done)
        assert not f.intermediate_values  # multi-objective studies do not report (no pruners)
    for t in done:
        if t.number not in {f.number for f in front}:
            assert any(dominates(f.values, t.values, dirs) for f in front)
    assert len({tuple(t.user_attrs["widths"]) for t in done}) >= 1
    assert (tmp_path / "out" / "plots" / "pareto_front.png").is_file()


def test_single_objective_pruner_records_intermediate_values(tmp_path):
    pruner = optuna.pruners.ThresholdPruner(lower=0.99, n_warmup_steps=0)  # prunes after the first report
    study = tune(RECIPE, 2, storage=sqlite_url(tmp_path), study_name="pruned", overrides=TINY, pruner=pruner,
                 output_dir=tmp_path / "out", quiet=True, plots=False)
    for t in study.trials:
        assert t.state == optuna.trial.TrialState.PRUNED
        assert list(t.intermediate_values) == [0]  # the pretrain step, then stopped
        assert not (tmp_path / "out" / f"trial_{t.number:04d}" / "elastic.pt").exists()


# ---------------------------------------------------------------------- errors
def test_bad_inputs_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown objective 'flops'.*accuracy.*macs.*latency"):
        tune(RECIPE, 1, objectives=("accuracy", "flops"))
    with pytest.raises(SearchSpaceError, match="empty"):
        tune(RECIPE, 1, search_space={}, storage=sqlite_url(tmp_path))
    with pytest.raises(SearchSpaceError, match="pinned"):
        tune(RECIPE, 1, search_space={"train.lr": {"_type": "uniform", "_value": [0.01, 0.1]}},
             overrides={"train.lr": 0.05}, storage=sqlite_url(tmp_path))
    with pytest.raises(RecipeError, match="strategy.grow_epoch"):
        tune(RECIPE, 1, search_space={"strategy.grow_epoch": {"_type": "randint", "_value": [1, 3]}},
             storage=sqlite_url(tmp_path))
    with pytest.raises(ValueError, match=r"pruner 'median'.*multi-objective"):
        tune(RECIPE, 1, objectives=("accuracy", "macs"), pruner="median", storage=sqlite_url(tmp_path))
    url = "postgresql://nobody@127.0.0.1:1/db"
    with pytest.raises(ValueError) as err:
        tune(RECIPE, 1, storage=url, quiet=True)
    assert url in str(err.value) and "sqlite:///" in str(err.value) and "journal" in str(err.value)
    with pytest.raises(ValueError, match="workers"):
        tune(RECIPE, 2, workers=2, storage=optuna.storages.InMemoryStorage())
    with pytest.raises(FileNotFoundError, match="prune_and_grow_nothing.json"):
        other = tmp_path / "nothing.yaml"
        other.write_text(RECIPE.read_text())
        tune(other, 1)


def test_importing_the_cli_module_does_not_import_optuna():
    code = "import sys, nni_elastic.optuna.cli; assert 'optuna' not in sys.modules, 'optuna imported'"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


# ---------------------------------------------------------------------- subnet search
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from nni_elastic.runner import run_recipe

    out = tmp_path_factory.mktemp("elastic")
    recipe = load_recipe(RECIPE, {"device": "cpu", "data.limit": 600, "strategy.pretrain_epochs": 3,
                                  "strategy.finetune_epochs": 1, "strategy.grow_epochs": 1,
                                  "strategy.calibrate_batches": 4})
    run_recipe(recipe, output=out, quiet=True, exports=False)
    return out / "elastic.pt"


def test_subnet_search_front_respects_the_budget_and_export_matches(checkpoint, tmp_path):
    result = search_subnets(checkpoint, data="digits", max_macs=0.5, n_trials=30, export_dir=tmp_path / "subnet",
                            quiet=True, seed=0, device="cpu")
    cap = 0.5 * result.full_macs
    assert result.front and result.best is not None
    assert all(r["macs"] <= cap for r in result.front)
    assert all(not (o["accuracy"] >= r["accuracy"] and o["macs"] < r["macs"]) for r in result.front for o in result.front)
    assert result.best["accuracy"] == max(r["accuracy"] for r in result.front)
    trials = result.study.trials
    over = [t for t in trials if t.user_attrs["macs"] > cap]
    assert over, "the uniform 0.75 and 1.0 configurations exceed half the MACs"
    for t in over:  # infeasible: constraint > 0, recorded, not evaluated
        assert t.user_attrs["constraint"][0] > 0 and not t.user_attrs["feasible"]
        if hasattr(t, "constraints"):
            assert t.constraints["macs"] > 0
    assert {r["widths"]["layer1"] for r in result.uniform} == {0.25, 0.5}
    assert result.trial_seconds is not None and result.trial_seconds < 10
    # the export is the best subnet: same outputs as the sliced model left at that configuration
    em = result.elastic_model.eval()
    x = torch.randn(16, *em.example_shape[1:])
    exported = ne.load_compact(tmp_path / "subnet" / "subnet.state.pt")  # weights + architecture: no code runs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.13 marks TorchScript deprecated
        scripted = torch.jit.load(str(tmp_path / "subnet" / "subnet.ts"))
    with torch.no_grad():
        sliced = em(x)
        torch.testing.assert_close(exported(x), sliced, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(scripted(x), sliced, atol=1e-4, rtol=1e-4)
    info = json.loads((tmp_path / "subnet" / "subnet.json").read_text())
    assert info["widths"] == result.best["widths"] and info["macs"] <= cap
    assert (tmp_path / "subnet" / "plots" / "pareto_front.png").is_file()


def test_subnet_search_with_a_latency_budget_and_a_stored_study(checkpoint, tmp_path):
    url = sqlite_url(tmp_path)
    result = search_subnets(checkpoint, max_latency_ms=1e4, n_trials=6, storage=url, study_name="lat", quiet=True,
                            device="cpu")
    assert all(r["latency_ms"] is not None and r["latency_ms"] <= 1e4 for r in result.front)
    assert len(load(url, "lat").trials) == 6  # in the storage, for optuna-dashboard


def test_subnet_search_errors(checkpoint):
    with pytest.raises(ValueError, match="no configuration of the search space fits"):
        search_subnets(checkpoint, max_macs=1e-4, n_trials=1, quiet=True, device="cpu")
    with pytest.raises(ValueError, match=r"'stage9'.*conv1.*layer3"):
        search_subnets(checkpoint, search_space={"stage9": {"_type": "choice", "_value": [0.5, 1.0]}}, n_trials=1,
                       quiet=True, device="cpu")
    with pytest.raises(ValueError, match="unknown objective"):
        search_subnets(checkpoint, objectives="accuracy,speed", n_trials=1, quiet=True)


# ---------------------------------------------------------------------- command line
def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="nni-elastic")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub, [common])
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_tune_and_search(checkpoint, tmp_path, capsys):
    url = journal_url(tmp_path)
    sets = [a for k, v in TINY.items() for a in ("--set", f"{k}={v}")]
    rc = run_cli(["tune", str(RECIPE), "--trials", "1", "--storage", url, "--study-name", "cli", "--objectives",
                  "accuracy,macs", "--pruner", "none", "--sampler", "random", "--out", str(tmp_path / "out"), *sets])
    assert rc == 0
    text = capsys.readouterr().out
    assert "Pareto front" in text and "optuna-dashboard" in text and "trial 0" in text
    assert len(load(url, "cli").trials) == 1
    rc = run_cli(["search", str(checkpoint), "--max-macs", "0.5", "--trials", "8", "--export", str(tmp_path / "sub")])
    assert rc == 0
    assert "Pareto front within the budget" in capsys.readouterr().out
    assert (tmp_path / "sub" / "subnet.state.pt").is_file() and not (tmp_path / "sub" / "subnet.pt").exists()


# ---------------------------------------------------------------------- PostgreSQL (slow)
@pytest.fixture
def postgres_url():
    """NNI_ELASTIC_PG_URL if set, else a throwaway local server (Debian's postgresql package, run as root)."""
    import importlib.util

    if not any(importlib.util.find_spec(m) for m in ("psycopg", "psycopg2")):
        pytest.skip("no PostgreSQL driver: pip install 'psycopg[binary]' (or psycopg2-binary)")
    if os.environ.get("NNI_ELASTIC_PG_URL"):
        yield os.environ["NNI_ELASTIC_PG_URL"]
        return
    bindir = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
    if not bindir or os.geteuid() != 0:
        pytest.skip("no PostgreSQL: set NNI_ELASTIC_PG_URL or apt-get install postgresql and run as root")
    bindir = bindir[-1]
    import shutil
    import tempfile

    home = Path(tempfile.mkdtemp(prefix="nni-elastic-pg-"))  # pytest's tmp dirs are private to root
    home.chmod(0o755)
    data = home / "data"
    data.mkdir()
    subprocess.run(["chown", "postgres", str(data)], check=True)
    port = 55432 + os.getpid() % 1000

    def as_postgres(*cmd: str) -> None:
        subprocess.run(["su", "postgres", "-s", "/bin/sh", "-c", " ".join(cmd)], check=True, capture_output=True)

    try:
        as_postgres(str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres")
        as_postgres(str(bindir / "pg_ctl"), "-D", str(data), "-w", "-l", str(data / "log"), "-o",
                    f"'-p {port} -k {data} -c listen_addresses=127.0.0.1'", "start")
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(["su", "postgres", "-s", "/bin/sh", "-c", f"{bindir / 'pg_ctl'} -D {data} -m fast stop"],
                       capture_output=True)
        shutil.rmtree(home, ignore_errors=True)


@pytest.mark.slow
def test_two_workers_on_postgresql(postgres_url, tmp_path):
    name = f"pg-{uuid.uuid4().hex[:8]}"
    tune(RECIPE, 4, storage=postgres_url, study_name=name, workers=2, overrides=TINY, output_dir=tmp_path / "out",
         quiet=True, plots=False, seed=0)
    trials = load(postgres_url, name).trials
    assert sorted(t.number for t in trials) == [0, 1, 2, 3] and all(t.state in DONE for t in trials)
    study = tune(RECIPE, 1, storage=postgres_url, study_name=name, overrides=TINY, output_dir=tmp_path / "out",
                 quiet=True, plots=False)
    assert len(study.trials) == 5
