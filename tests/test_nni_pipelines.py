"""NNI pipelines against real NNI 3.0 (no mocks): shipped experiment configs, trial entries, OptunaTuner.

Default suite (under a minute): every ``search_spaces/*.yml`` is a valid NNI v2 experiment config
whose search space the Optuna adapter translates and whose every value is a valid value of the
recipe key it names; the trial entries run outside NNI (standalone mode) for both methods and
fail with the recipe error named on stderr; the subnet trial reports what ``evaluate_subnet``
computes; ``OptunaTuner`` asks NNI-valid parameters and tells results and failures to a stored
study; registration goes through NNI's own registry in a temporary config directory.

Slow (``-m slow``, minutes): real ``nnictl create`` experiments in a temporary HOME (NNI's
experiment list and config directory are per HOME, so the user's stay untouched), polled over
NNI's REST API and stopped by id.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path
from typing import Any, Optional

import optuna
import pytest
import torch
import yaml

nni = pytest.importorskip("nni")

from nni.experiment.config import ExperimentConfig  # noqa: E402
from nni.tools import package_utils  # noqa: E402
from nni.tools.package_utils.tuner_factory import create_builtin_class_instance  # noqa: E402
from nni.tuner import Tuner  # noqa: E402

from nni_elastic import ElasticModel  # noqa: E402
from nni_elastic.config import load_recipe, parse_overrides  # noqa: E402
from nni_elastic.models import create_model  # noqa: E402
from nni_elastic.nni import (  # noqa: E402
    OptunaTuner,
    final_metric,
    register_tuner,
    run_subnet_trial,
    run_trial,
    unregister_tuner,
    write_tuner_meta,
)
from nni_elastic.nni import subnet_trial as subnet_trial_module  # noqa: E402
from nni_elastic.nni import trial as trial_module  # noqa: E402
from nni_elastic.nni.cli import add_parser  # noqa: E402
from nni_elastic.optuna import check_params, find_search_space, load_search_space, to_distributions  # noqa: E402
from nni_elastic.optuna._space import default_search_space  # noqa: E402
from nni_elastic.subnet import SubnetEvaluator, evaluate_subnet, model_stages, stage_level  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "search_spaces").glob("*.yml"))
PG_RECIPE = "strategies/prune_and_grow/digits.yaml"
EG_RECIPE = "strategies/expansion_growth/digits.yaml"
# a prune-and-grow trial in a few seconds: few samples, one epoch per phase
TINY_SET = ["data.limit=200", "strategy.pretrain_epochs=1", "strategy.finetune_epochs=1", "strategy.grow_epochs=1",
            "strategy.prune_steps=3", "strategy.calibrate_batches=2", "device=cpu"]
TRIAL_KEYS = {"default", "accuracy", "macs", "params", "latency_ms", "macs_ratio", "mean_accuracy", "levels",
              "acc_level0", "macs_level0", "params_level0"}
SUBNET_KEYS = {"default", "accuracy", "feasible", "violation", "macs", "macs_ratio", "params", "params_ratio"}
# NNI warns that a trial runs without an experiment: that is what these tests do on purpose
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*Running trial code without runtime:RuntimeWarning"),
    pytest.mark.usefixtures("one_thread"),
]
TRIAL_MODULES = {"nni_elastic.nni.trial": trial_module, "nni_elastic.nni.subnet_trial": subnet_trial_module}




@pytest.fixture(scope="module", autouse=True)
def nni_config_dir(tmp_path_factory: pytest.TempPathFactory):
    # NNI writes its default config files on first read: keep them out of the user's config directory
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NNI_CONFIG_DIR", str(tmp_path_factory.mktemp("nni-config")))
        yield


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NNI_") or k == "NNI_CONFIG_DIR"}  # no experiment
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def _trial_command(command: str) -> tuple[str, argparse.Namespace]:
    """The trial module and its parsed options from a config's ``trialCommand``."""
    argv = shlex.split(command)
    while argv and "=" in argv[0] and not argv[0].startswith("-"):  # leading VAR=value assignments
        argv.pop(0)
    # `python`, or an interpreter by absolute path (remote workers: a ~/.bashrc may change PATH there)
    assert argv[1:2] == ["-m"] and (argv[0] == "python" or (argv[0].startswith("/") and
                                    Path(argv[0]).name.startswith("python"))), \
        f"trialCommand {command!r} should run `python -m <module>`"
    module = argv[2]
    assert module in TRIAL_MODULES, f"trialCommand runs {module!r}, not one of {sorted(TRIAL_MODULES)}"
    parser = argparse.ArgumentParser()
    TRIAL_MODULES[module].add_arguments(parser)
    return module, parser.parse_args(argv[3:])


def _space_values(spec: dict) -> list[Any]:
    """Every choice, or the bounds NNI can produce (randint's upper bound is exclusive)."""
    kind, args = spec["_type"], spec["_value"]
    if kind == "choice":
        return list(args)
    if kind == "randint":
        return [args[0], args[1] - 1]
    return [args[0], args[1]]


# ---------------------------------------------------------------------- shipped configs
def test_every_search_space_has_a_config_and_the_expansion_space_is_the_recipe_default() -> None:
    assert {p.name for p in CONFIGS} >= {
        "prune_and_grow_digits.yml", "prune_and_grow_fashion_mnist_resnet20.yml", "prune_and_grow_cifar10_resnet20.yml",
        "prune_and_grow_cifar10_resnet56.yml", "prune_and_grow_cifar10_vgg16.yml", "expansion_growth_digits.yml",
        "subnet_search_digits.yml"}
    # `nni-elastic tune strategies/expansion_growth/digits.yaml` finds the same space the NNI config uses
    found = find_search_space(default_search_space("expansion_growth", "digits"), near=ROOT / "strategies")
    assert found.resolve() == (ROOT / "search_spaces" / "expansion_growth_digits.json").resolve()


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_config_is_a_valid_nni_experiment(path: Path, tmp_path: Path) -> None:
    config = ExperimentConfig.load(path)
    if config.training_service.platform == "remote":  # NNI checks that each machine's SSH key file exists
        (tmp_path / "id_key").write_text("")
        for machine in config.training_service.machine_list:
            machine.ssh_key_file = str(tmp_path / "id_key")
    canon = config.json()  # NNI's own canonicalisation and validation (raises on a bad config)
    assert canon["trainingService"]["platform"] == ("remote" if path.name.startswith("remote") else "local")
    assert Path(canon["trialCodeDirectory"]).resolve() == ROOT  # `trialCodeDirectory: ..` is the repository root
    assert canon["maxTrialNumber"] and canon["maxExperimentDuration"]
    space = load_search_space(canon["searchSpaceFile"])
    assert set(to_distributions(space)) == set(space)  # the Optuna adapter translates it
    tuner = canon["tuner"]
    if tuner.get("className"):
        assert Path(tuner["codeDirectory"]).resolve() == ROOT
        module, _, name = tuner["className"].rpartition(".")
        cls = getattr(__import__(module, fromlist=[name]), name)
        assert issubclass(cls, Tuner)
        storage = f"sqlite:///{tmp_path / 'study.db'}"  # constructing it checks the classArgs
        cls(**{**tuner.get("classArgs", {}), "storage": storage}).update_search_space(space)
    else:
        assert package_utils.get_algo_meta(tuner["name"]) is not None, f"{tuner['name']} is not an NNI tuner"

    module, args = _trial_command(canon["trialCommand"])
    if module == "nni_elastic.nni.trial":
        recipe = ROOT / args.recipe
        assert recipe.is_file(), f"trialCommand's recipe {args.recipe} does not exist"
        pinned = parse_overrides(args.set)
        for key, spec in space.items():  # every value the tuner can send is valid for the recipe key it names
            for value in _space_values(spec):
                load_recipe(recipe, {key: value, **pinned}, check_paths=False)
    else:  # subnet search: the checkpoint is what the shipped digits recipe writes, the keys are its stages
        recipe = load_recipe(ROOT / PG_RECIPE)
        assert Path(args.checkpoint) == Path(recipe.output) / "elastic.pt"
        em = ElasticModel(create_model(recipe.model.name, num_classes=10, in_channels=1), torch.randn(1, 1, 8, 8),
                          widths=recipe.elastic.widths)
        assert set(space) <= set(model_stages(em))
        for spec in space.values():
            assert set(spec["_value"]) <= set(recipe.elastic.widths)  # the levels it trained


# ---------------------------------------------------------------------- trials outside NNI
def test_trial_outside_nni_parses_list_parameters_and_prints_the_final_metric(tmp_path: Path) -> None:
    out = tmp_path / "trial"
    params = {"elastic.widths": "[0.25, 0.5, 1.0]", "strategy.grow_mode": "freeze"}  # as the tuner sends them
    argv = [sys.executable, "-m", "nni_elastic.nni.trial", "--recipe", PG_RECIPE, "--out", str(out),
            "--params", json.dumps(params), "--quiet"]
    for item in TINY_SET:
        argv += ["--set", item]
    proc = subprocess.run(argv, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("final metric: ")][-1]
    metric = json.loads(line[len("final metric: "):])
    assert TRIAL_KEYS <= set(metric)
    assert metric["levels"] == 3 and metric["width_level0"] == 0.25  # the YAML string became a list
    assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in metric.values())
    assert metric["default"] == metric["acc_level2"]  # --level largest (default)
    written = json.loads((out / "metrics.json").read_text())
    assert written["metric"] == metric and written["parameters"] == params
    assert (out / "elastic.pt").is_file() and (out / "exports" / "level0.state.pt").is_file()
    assert json.loads((out / "levels.json").read_text())["levels"][0]["width"] == 0.25


def test_trial_with_an_impossible_parameter_exits_nonzero_naming_the_key(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "nni_elastic.nni.trial", "--recipe", PG_RECIPE, "--out", str(tmp_path / "t"),
            "--params", json.dumps({"strategy.grow_mode": "frozen"})]
    proc = subprocess.run(argv, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "strategy.grow_mode: 'frozen' is not one of ['freeze', 'joint']" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "t" / "metrics.json").exists()


def test_expansion_growth_trial_reports_its_complexity_levels(tmp_path: Path) -> None:
    metric = run_trial(EG_RECIPE, params={"strategy.candidates": "[width]", "strategy.check_every": 12},
                       overrides={"data.limit": 300, "strategy.epochs": 4, "strategy.warmup_steps": 5, "device": "cpu"},
                       level="mean", output=str(tmp_path), quiet=True)
    rows = json.loads((tmp_path / "levels.json").read_text())["checkpoints"]
    assert metric["levels"] == len(rows) >= 1
    assert metric["default"] == pytest.approx(sum(r["accuracy"] for r in rows) / len(rows))
    assert {f"acc_level{i}" for i in range(len(rows))} <= set(metric)


def test_final_metric_picks_the_level_and_keeps_numbers_only() -> None:
    rows = [{"level": i, "width": w, "macs": m, "params": p, "accuracy": a, "latency_ms": None}
            for i, (w, m, p, a) in enumerate([(0.5, 10, 4, 0.6), (1.0, 40, 16, 0.9)])]
    largest, smallest, mean, first = (final_metric(rows, lv) for lv in ("largest", "smallest", "mean", 0))
    assert largest["default"] == 0.9 and smallest["default"] == 0.6 == first["default"]
    assert mean["default"] == pytest.approx(0.75) and smallest["macs_ratio"] == 0.25
    assert final_metric(rows, -2) == smallest
    assert "latency_ms" not in largest and "latency_ms_level0" not in largest  # None is left out, not sent
    with pytest.raises(ValueError, match="2 levels"):
        final_metric(rows, 2)
    with pytest.raises(ValueError, match="largest"):
        trial_module.parse_level("biggest")


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An (untrained) elastic ResNet-20 for digits, saved like a run's elastic.pt."""
    torch.manual_seed(0)
    em = ElasticModel(create_model("resnet20", num_classes=10, in_channels=1), torch.randn(1, 1, 8, 8),
                      widths=(0.25, 0.5, 0.75, 1.0))
    path = tmp_path_factory.mktemp("ckpt") / "elastic.pt"
    em.save(path)
    return path


def test_subnet_trial_reports_what_evaluate_subnet_computes(small_checkpoint: Path, tmp_path: Path) -> None:
    inside = {"conv1": 0.5, "layer1": 0.5, "layer2": 0.5, "layer3": 0.75}
    metric = run_subnet_trial(str(small_checkpoint), params=inside, max_macs=0.5, calibrate_batches=2,
                              device="cpu", output=str(tmp_path / "in"))
    ev = SubnetEvaluator.from_checkpoint(small_checkpoint, calibrate_batches=2, device="cpu")
    full = ev.full_cost()
    row = evaluate_subnet(ev, inside, macs_cap=0.5 * full["macs"])
    assert SUBNET_KEYS <= set(metric) and metric["feasible"] == 1 and row["feasible"]
    assert metric["default"] == metric["accuracy"] == pytest.approx(row["accuracy"])
    assert metric["macs"] == row["macs"] == ev.em.count(stage_level(ev.em, inside))[0]  # counted on the export
    assert (tmp_path / "in" / "subnet.ts").is_file() and (tmp_path / "in" / "metrics.json").is_file()

    over = {"conv1": 1.0, "layer1": 1.0, "layer2": 1.0, "layer3": 1.0}  # full network: twice the budget
    metric = run_subnet_trial(str(small_checkpoint), params=over, max_macs=0.5, calibrate_batches=2, device="cpu",
                              output=str(tmp_path / "over"))
    assert metric["feasible"] == 0 and metric["accuracy"] == 0.0
    assert metric["default"] == pytest.approx(-1.0) and metric["violation"] == pytest.approx(1.0)
    assert not (tmp_path / "over" / "subnet.state.pt").exists() and not (tmp_path / "over" / "subnet.ts").exists()


def test_subnet_trial_errors_name_the_problem(small_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"stage\(s\) \['conv9'\] match no channel group"):
        run_subnet_trial(str(small_checkpoint), params={"conv9": 0.5}, device="cpu", output=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="nni-elastic run strategies/prune_and_grow/digits.yaml"):
        run_subnet_trial(str(tmp_path / "missing.pt"), params={"conv1": 0.5}, output=str(tmp_path))


# ---------------------------------------------------------------------- tuner and registration
def test_optuna_tuner_asks_valid_parameters_and_tells_results_and_failures(tmp_path: Path) -> None:
    space = load_search_space(ROOT / "search_spaces" / "expansion_growth_digits.json")
    url = f"sqlite:///{tmp_path / 'study.db'}"
    tuner = OptunaTuner(sampler="random", seed=0, storage=url, study_name="eg")
    tuner.update_search_space(space)
    params = [tuner.generate_parameters(i) for i in range(4)]
    for p in params:
        check_params(space, p)  # values NNI's own tuners could have produced
        load_recipe(ROOT / EG_RECIPE, p)  # and the recipe accepts them
    tuner.receive_trial_result(0, params[0], {"default": 0.8, "macs": 5.0}, trial_job_id="AAAAA")
    tuner.receive_trial_result(1, params[1], 0.7)  # a plain number is the default metric
    tuner.trial_end(2, success=False)  # failed trial: no result
    tuner.trial_end(3, success=True)  # ended, result not (yet) there: stays running until the experiment ends
    tuner._on_exit()
    study = optuna.load_study(study_name="eg", storage=url)
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "COMPLETE", "FAIL", "FAIL"]
    assert [t.value for t in study.trials[:2]] == [0.8, 0.7]
    assert study.trials[0].user_attrs["nni_trial_job_id"] == "AAAAA" and study.trials[0].params == params[0]
    assert study.trials[0].user_attrs["metric"] == {"default": 0.8, "macs": 5.0}
    assert study.user_attrs["search_space"] == space

    # resume: the same study continues; NNI re-sending a known result does not duplicate it
    again = OptunaTuner(sampler="random", storage=url, study_name="eg")
    again.update_search_space(space)
    again.import_data([{"parameter": params[0], "value": {"default": 0.8}}])
    assert len(optuna.load_study(study_name="eg", storage=url).trials) == 4


def test_optuna_tuner_multi_objective_with_constraints(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    tuner = OptunaTuner(sampler="nsga2", objectives=["default", "macs"], constraints=["violation"], storage=url,
                        study_name="pareto", seed=1)
    tuner.update_search_space(load_search_space(ROOT / "search_spaces" / "subnet_search.json"))
    p = tuner.generate_parameters(0)
    tuner.receive_trial_result(0, p, {"default": 0.5, "macs": 100, "violation": 0.2})
    tuner.receive_trial_result(1, tuner.generate_parameters(1), {"default": 0.5})  # "macs" missing: FAIL
    trials = optuna.load_study(study_name="pareto", storage=url).trials
    assert [d.name for d in optuna.load_study(study_name="pareto", storage=url).directions] == ["MAXIMIZE", "MINIMIZE"]
    assert trials[0].values == [0.5, 100.0] and trials[1].state.name == "FAIL"
    assert trials[0].user_attrs["constraint"] == [0.2]


def test_optuna_tuner_rejects_bad_class_args() -> None:
    with pytest.raises(ValueError, match="unknown sampler 'annealing'"):
        OptunaTuner(sampler="annealing")
    with pytest.raises(ValueError, match="directions"):
        OptunaTuner(objectives=["default", "macs"], directions=["maximize"])
    with pytest.raises(ValueError, match="not arguments of optuna.samplers.TPESampler"):
        OptunaTuner(sampler_kwargs={"population_size": 4})


def test_register_tuner_in_a_temporary_nni_config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NNI_CONFIG_DIR", str(tmp_path / "nni-config"))
    entry = register_tuner()
    assert entry["registry"] == str(tmp_path / "nni-config" / "registered_algorithms.yml")
    assert yaml.safe_load(Path(entry["registry"]).read_text())["tuners"][0]["className"] == "nni_elastic.nni.OptunaTuner"
    # what NNI's dispatcher does for `tuner: {name: OptunaTuner, classArgs: ...}`
    tuner = create_builtin_class_instance("OptunaTuner", {"storage": f"sqlite:///{tmp_path / 's.db'}"}, "tuners")
    assert isinstance(tuner, OptunaTuner)
    assert unregister_tuner() and package_utils.get_algo_meta("OptunaTuner") is None
    meta = yaml.safe_load(write_tuner_meta(tmp_path / "meta.yml").read_text())
    assert meta == {"algoType": "tuner", "builtinName": "OptunaTuner", "className": "nni_elastic.nni.OptunaTuner"}


def test_cli_parser_has_the_nni_commands() -> None:
    parser = argparse.ArgumentParser(prog="nni-elastic")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true")
    common.add_argument("--verbose", action="store_true")
    add_parser(parser.add_subparsers(dest="command", required=True), [common])
    args = parser.parse_args(["nni", "trial", "--recipe", PG_RECIPE, "--set", "data.limit=100", "--level", "mean",
                              "--quiet"])
    assert args.level == "mean" and args.set == ["data.limit=100"] and args.quiet
    args = parser.parse_args(["nni", "subnet-trial", "--checkpoint", "x.pt", "--max-macs", "0.5"])
    assert args.max_macs == 0.5
    assert parser.parse_args(["nni", "register", "--config-dir", "d"]).config_dir == "d"


# ---------------------------------------------------------------------- real experiments (nnictl)
def _nnictl() -> str:
    """The nnictl script of this interpreter (no shell shims, which may depend on HOME)."""
    script = Path(sysconfig.get_path("scripts")) / "nnictl"
    return str(script) if script.is_file() else "nnictl"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _get(port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://localhost:{port}/api/v1/nni/{path}", timeout=10) as r:
        return json.loads(r.read())


def _final(trial: dict) -> Optional[dict]:
    """A trial's final metric as the trial reported it (NNI stores it JSON-encoded twice)."""
    data = trial.get("finalMetricData") or []
    return json.loads(json.loads(data[0]["data"])) if data else None


def _experiment_config(shipped: str, tmp_path: Path, **changes: Any) -> dict:
    """A shipped config made tiny and self-contained: absolute paths, this interpreter, temp directories."""
    config = yaml.safe_load((ROOT / "search_spaces" / shipped).read_text())
    config["searchSpaceFile"] = str(ROOT / "search_spaces" / config["searchSpaceFile"])
    config["trialCodeDirectory"] = str(ROOT)
    config["trialCommand"] = config["trialCommand"].replace("python -m", f"{shlex.quote(sys.executable)} -m", 1)
    config["experimentWorkingDirectory"] = str(tmp_path / "nni-experiments")
    if config["tuner"].get("codeDirectory"):
        config["tuner"]["codeDirectory"] = str(ROOT)
    config.update(trialConcurrency=1, maxExperimentDuration="15m", **changes)
    return config


class Experiment:
    """An experiment started with ``nnictl create`` in a temporary HOME; always stopped by id."""

    def __init__(self, config: dict, tmp_path: Path) -> None:
        self.path = tmp_path / "experiment.yml"
        self.path.write_text(yaml.safe_dump(config, sort_keys=False))
        home = tmp_path / "home"
        home.mkdir(exist_ok=True)
        # nnictl keeps its experiment list under HOME and NNI its algorithm registry in NNI_CONFIG_DIR
        self.env = _env(HOME=str(home), NNI_CONFIG_DIR=str(tmp_path / "nni-config"))
        self.port, self.id = _free_port(), None

    def nnictl(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([_nnictl(), *args], cwd=ROOT, env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def __enter__(self) -> "Experiment":
        proc = self.nnictl("create", "--config", str(self.path), "--port", str(self.port))
        found = re.search(r"Experiment ID: (\w+)", re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout + proc.stderr))
        self.id = found.group(1) if found else None
        try:
            assert proc.returncode == 0 and self.id, proc.stdout + proc.stderr
            assert _get(self.port, "experiment")["id"] == self.id
        except BaseException:
            self.__exit__()  # `with` calls __exit__ only after __enter__ returned
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.id is not None:
            self.nnictl("stop", self.id)

    def wait(self, timeout: float = 600) -> list[dict]:
        """Poll until the experiment is done (every trial finished); returns NNI's trial records."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            status = _get(self.port, "check-status")
            trials = _get(self.port, "trial-jobs")
            finished = trials and all(t["status"] in ("SUCCEEDED", "FAILED", "USER_CANCELED", "SYS_CANCELED")
                                      for t in trials)
            if status["status"] == "ERROR":
                pytest.fail(f"experiment {self.id} errored: {status['errors']}\n{self.log('dispatcher.log')}")
            if status["status"] in ("DONE", "NO_MORE_TRIAL", "TUNER_NO_MORE_TRIAL") and finished:
                return trials
            time.sleep(2)
        pytest.fail(f"experiment {self.id} not done after {timeout} s: {status}, "
                    f"{[(t['trialJobId'], t['status']) for t in trials]}\n{self.log('nnimanager.log')}")

    def log(self, name: str) -> str:
        path = Path(self.env["HOME"]).parent / "nni-experiments" / str(self.id) / "log" / name
        return path.read_text()[-4000:] if path.is_file() else f"(no {path})"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_nnictl_experiment_runs_trials_that_report_metrics(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    config = _experiment_config("prune_and_grow_digits.yml", tmp_path, maxTrialNumber=3)
    config["trialCommand"] += "".join(f" --set {item}" for item in TINY_SET)
    config["tuner"]["classArgs"].update(storage=storage, study_name="pg", sampler_kwargs={"n_startup_trials": 2})
    with Experiment(config, tmp_path) as exp:
        trials = exp.wait()
        intermediate = _get(exp.port, "metric-data")
    assert len(trials) == 3 and {t["status"] for t in trials} == {"SUCCEEDED"}, trials
    study = optuna.load_study(study_name="pg", storage=storage)
    by_job = {t.user_attrs["nni_trial_job_id"]: t for t in study.trials}
    for t in trials:
        metric = _final(t)
        assert TRIAL_KEYS | {"parameter_id"} <= set(metric)
        assert sum(m["type"] == "PERIODICAL" and m["trialJobId"] == t["trialJobId"] for m in intermediate) >= 3
        out = Path(t["logPath"])  # NNI's trial output directory holds the run
        assert (out / "elastic.pt").is_file() and (out / "exports" / "level0.ts").is_file()
        assert json.loads((out / "metrics.json").read_text())["metric"] == metric
        told = by_job[t["trialJobId"]]  # the Optuna study got the same value, with the parameters that ran
        assert told.state.name == "COMPLETE" and told.value == metric["default"]
        assert told.params == json.loads((out / "metrics.json").read_text())["parameters"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_nnictl_experiment_marks_an_impossible_trial_failed_and_goes_on(tmp_path: Path) -> None:
    space = tmp_path / "space.json"
    space.write_text(json.dumps({"strategy.grow_mode": {"_type": "choice", "_value": ["frozen", "joint"]}}))
    config = _experiment_config("prune_and_grow_digits.yml", tmp_path, maxTrialNumber=2, searchSpaceFile=str(space),
                                tuner={"name": "GridSearch"})
    config["trialCommand"] += "".join(f" --set {item}" for item in TINY_SET)
    with Experiment(config, tmp_path) as exp:
        trials = exp.wait()
    by_status = {t["status"]: t for t in trials}
    assert set(by_status) == {"FAILED", "SUCCEEDED"}, trials
    failed = Path(by_status["FAILED"]["logPath"])
    stderr = (failed / "trial.stderr").read_text()
    assert "strategy.grow_mode: 'frozen' is not one of ['freeze', 'joint']" in stderr
    assert _final(by_status["FAILED"]) is None and _final(by_status["SUCCEEDED"])["default"] > 0


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_registered_optuna_tuner_runs_a_subnet_search_experiment(tmp_path: Path) -> None:
    from nni_elastic.runner import run_recipe

    recipe = load_recipe(ROOT / PG_RECIPE, parse_overrides(TINY_SET))
    checkpoint = run_recipe(recipe, output=tmp_path / "run", quiet=True, exports=False).output / "elastic.pt"
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    config = _experiment_config("subnet_search_digits.yml", tmp_path, maxTrialNumber=4, tuner={
        "name": "OptunaTuner", "classArgs": {"sampler": "nsga2", "objectives": ["default", "macs"],
                                             "constraints": ["violation"], "storage": storage, "study_name": "subnets"}})
    config["trialCommand"] = config["trialCommand"].replace("runs/prune_and_grow/digits/elastic.pt",
                                                            str(checkpoint)) + " --calibrate-batches 2"
    exp = Experiment(config, tmp_path)
    # the documented way, into the experiment's (temporary) NNI config directory
    registered = exp.nnictl("algo", "register", "--meta", str(write_tuner_meta(tmp_path / "meta.yml")))
    assert registered.returncode == 0 and "registered" in registered.stdout, registered.stdout + registered.stderr
    assert "OptunaTuner" in (tmp_path / "nni-config" / "registered_algorithms.yml").read_text()
    with exp:
        trials = exp.wait()
    assert len(trials) == 4 and {t["status"] for t in trials} == {"SUCCEEDED"}, trials
    study = optuna.load_study(study_name="subnets", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 4
    by_job = {t.user_attrs["nni_trial_job_id"]: t for t in study.trials}
    for t in trials:
        metric = _final(t)
        assert SUBNET_KEYS <= set(metric)
        told = by_job[t["trialJobId"]]
        assert told.values == [metric["default"], metric["macs"]]
        assert told.params == json.loads((Path(t["logPath"]) / "metrics.json").read_text())["widths"]
