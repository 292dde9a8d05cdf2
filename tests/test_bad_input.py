"""Bad input as a user meets it, through the real CLI (subprocess) and the Python API.

Every case asserts the exit code (2) or the exception, one line naming the offending thing, and
that nothing was written or lost. Crafted pickles prove that no loading path runs code from a file:
each one would create a marker file when unpickled.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
import yaml

import nni_elastic as ne
from datafiles import write_cifar10
from nni_elastic.checkpoint import CheckpointError, atomic_save
from nni_elastic.config import load_recipe
from nni_elastic.optuna._study import make_sampler
from nni_elastic.runner import run_recipe
from nni_elastic.strategies import load_growth_checkpoint

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "strategies" / "prune_and_grow" / "digits.yaml"
GROWTH_RECIPE = ROOT / "strategies" / "expansion_growth" / "digits.yaml"
TINY = ["--set", "data.limit=200", "--set", "strategy.pretrain_epochs=1", "--set", "strategy.prune_steps=3",
        "--set", "strategy.finetune_epochs=1", "--set", "strategy.grow_epochs=1", "--set", "strategy.calibrate_batches=2"]


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``nni-elastic ARGS`` as a user runs it."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "nni_elastic.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with a hash of its bytes (to show that nothing changed)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------- crafted files
class Payload:
    """Unpickling this creates ``marker``: the proof that a load ran code from the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    path = tmp_path / "PWNED"
    yield path
    assert not path.exists(), "a file ran code on load"


def evil_checkpoint(path: Path, marker: Path, **fields) -> Path:
    """A torch file whose pickle runs code (an ``elastic.pt`` lookalike by default)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": "nni-elastic/elastic-model", "version": 1, **fields, "x": Payload(marker)}, path)
    return path


def evil_module_bytes(path: Path, marker: Path) -> Path:
    """An old-style elastic checkpoint: safe outer file, a custom model pickled as bytes inside."""
    em = ne.ElasticModel(ne.create_model("resnet20", in_channels=1), torch.zeros(1, 1, 8, 8), widths=(0.5, 1.0))
    em.model.nni_elastic_arch = None
    em.save(path, pickle_model=True)
    payload = torch.load(path, weights_only=True)
    payload["module"] = pickle.dumps(Payload(marker))
    payload["module_class"] = "mypackage.MyNet"
    atomic_save(payload, path)
    return path


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory) -> Path:
    """A real elastic checkpoint (untrained resnet20 on 8x8 digits, two levels)."""
    path = tmp_path_factory.mktemp("ckpt") / "elastic.pt"
    torch.manual_seed(0)
    em = ne.ElasticModel(ne.create_model("resnet20", in_channels=1), torch.zeros(1, 1, 8, 8), widths=(0.5, 1.0))
    em.save(path, note="small")
    return path


# ---------------------------------------------------------------------- 1. no code runs from a file
@pytest.mark.parametrize("command", [
    ["levels", "{ckpt}", "--no-latency"],
    ["export", "{ckpt}", "--out", "{out}"],
    ["search", "{ckpt}", "--trials", "2"],
])
def test_cli_refuses_a_crafted_checkpoint(command, tmp_path, marker):
    ckpt = evil_checkpoint(tmp_path / "elastic.pt", marker)
    out = tmp_path / "exports"
    proc = cli(*[c.format(ckpt=ckpt, out=out) for c in command], cwd=tmp_path)
    assert_one_line_error(proc, str(ckpt), "refused to load", "--trust-checkpoint")
    assert not out.exists() or not any(out.iterdir())


def test_cli_refuses_pickled_module_bytes_without_trust(tmp_path, marker):
    ckpt = evil_module_bytes(tmp_path / "elastic.pt", marker)
    proc = cli("levels", str(ckpt), "--no-latency", cwd=tmp_path)
    assert_one_line_error(proc, str(ckpt), "mypackage.MyNet", "stored pickled", "--trust-checkpoint")


def test_python_loaders_refuse_crafted_files(tmp_path, marker):
    elastic = evil_checkpoint(tmp_path / "elastic.pt", marker)
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(elastic))}: refused to load.*posix.system"):
        ne.ElasticModel.load(elastic)
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(elastic))}: refused"):
        ne.ElasticModel.load(elastic, model=ne.create_model("resnet20", in_channels=1))
    inner = evil_module_bytes(tmp_path / "inner.pt", marker)
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(inner))}: the model \(mypackage.MyNet\) is stored pickled.*trust=True"):
        ne.ElasticModel.load(inner)
    growth = evil_checkpoint(tmp_path / "level0.pt", marker, format="nni-elastic/growth-checkpoint")
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(growth))}: refused"):
        load_growth_checkpoint(growth)
    compact = evil_checkpoint(tmp_path / "level0.state.pt", marker, format="nni-elastic/compact-model")
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(compact))}: refused"):
        ne.load_compact(compact)
    raw = tmp_path / "raw.pt"  # a bare pickle, not even a torch zip
    raw.write_bytes(pickle.dumps({"x": Payload(marker)}))
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(raw))}: refused"):
        ne.ElasticModel.load(raw)


@pytest.fixture(scope="module")
def digits():
    return ne.data.load_dataset("digits", limit=200)


def test_growth_resume_refuses_a_crafted_state(digits, tmp_path, marker):
    state = evil_checkpoint(tmp_path / "state.pt", marker, format="nni-elastic/growth-checkpoint-state")
    eg = ne.ExpansionGrowth(epochs=1, quiet=True, checkpoint_dir=tmp_path)
    model = ne.create_model("growable_cnn", in_channels=1, channels=[4], blocks=[0])
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(state))}: refused"):
        eg.fit(model, digits.train, digits.val, resume=True)


@pytest.mark.parametrize("name", ["elastic.pt", "pretrain.pt"])
def test_prune_and_grow_resume_refuses_a_crafted_checkpoint(name, digits, tmp_path, marker):
    evil = evil_checkpoint(tmp_path / name, marker)
    pg = ne.PruneAndGrow(widths=(0.5, 1.0), pretrain_epochs=1, quiet=True, checkpoint_dir=tmp_path)
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(evil))}: refused"):
        pg.fit(ne.create_model("resnet20", in_channels=1), digits.train, digits.val, resume=True)


def test_cli_run_resume_refuses_a_crafted_checkpoint(tmp_path, marker):
    evil = evil_checkpoint(tmp_path / "run" / "checkpoints" / "elastic.pt", marker)
    before = snapshot(tmp_path / "run")
    proc = cli("run", str(RECIPE), "--out", str(tmp_path / "run"), "--resume", "--quiet", *TINY, cwd=tmp_path)
    assert_one_line_error(proc, str(evil), "refused to load")
    assert {k: v for k, v in snapshot(tmp_path / "run").items() if k != "recipe.yaml"} == before


def test_cifar_loader_refuses_a_crafted_batch(tmp_path, marker):
    folder = write_cifar10(tmp_path, 4, 4)
    (folder / "data_batch_2").write_bytes(pickle.dumps({b"data": Payload(marker)}))
    with pytest.raises(ValueError, match=r"data_batch_2: refused to load.*posix.system"):
        ne.data.load_dataset("cifar10", root=folder)
    proc = cli("train", "--data", "cifar10", "--data-root", str(folder), "--out", str(tmp_path / "o"), "--quiet",
               cwd=tmp_path)
    assert_one_line_error(proc, "data_batch_2", "refused to load")


def test_exports_load_without_running_code(small_checkpoint, tmp_path):
    proc = cli("export", str(small_checkpoint), "--out", str(tmp_path / "x"), "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["level0.state.pt", "level0.ts", "level1.state.pt", "level1.ts"]
    em = ne.ElasticModel.load(small_checkpoint).eval()
    x = torch.randn(3, 1, 8, 8)
    for i in range(em.num_levels):
        torch.load(tmp_path / "x" / f"level{i}.state.pt", weights_only=True)
        compact = ne.load_compact(tmp_path / "x" / f"level{i}.state.pt")
        with torch.no_grad(), em.use_level(i):
            torch.testing.assert_close(compact(x), em(x), atol=1e-5, rtol=1e-5)


def test_width_grown_model_round_trips_without_pickles(tmp_path):
    from nni_elastic.expansion.ops import widen_group
    from nni_elastic.graph import build_channel_graph

    torch.manual_seed(0)
    model, x = ne.create_model("resnet20", in_channels=1), torch.randn(2, 1, 8, 8)
    widen_group(model, build_channel_graph(model, x[:1]).groups[0], 3)  # no longer the zoo's shapes
    em = ne.ElasticModel(model, x[:1], widths=(0.5, 1.0)).eval()
    em.save(tmp_path / "grown.pt")
    loaded = ne.ElasticModel.load(tmp_path / "grown.pt").eval()
    with torch.no_grad():
        for i in range(em.num_levels):
            em.set_level(i), loaded.set_level(i)
            assert torch.equal(loaded(x), em(x))


# ---------------------------------------------------------------------- 2. no silent wrong results
class Interrupt(Exception):
    pass


def test_resume_refuses_a_changed_recipe_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    overrides = {a.split("=")[0]: a.split("=")[1] for a in TINY[1::2]}

    def stop_after_pruning(info):
        if info.name.startswith("prune_3"):  # the last pruning step: the core is done, no level grown
            raise Interrupt

    with pytest.raises(Interrupt):
        run_recipe(load_recipe(RECIPE, overrides), output=out, quiet=True, on_step_end=stop_after_pruning)
    (out / "checkpoints" / ".elastic.pt.999999999.abc123.tmp").write_bytes(b"left by a killed write")
    before = snapshot(out)
    proc = cli("run", str(RECIPE), "--out", str(out), "--resume", "--quiet", *TINY,
               "--set", "elastic.widths=[0.5,1.0]", "--set", "train.lr=0.1", cwd=tmp_path)
    assert_one_line_error(proc, "--resume", "elastic.widths: [0.25, 0.5, 0.75, 1.0] -> [0.5, 1.0]", "train.lr",
                          str(out / "recipe.yaml"))
    assert snapshot(out) == before  # nothing written, nothing lost
    # keys that cannot change the result may differ; the resumed run finishes the 4 levels
    proc = cli("run", str(RECIPE), "--out", str(out), "--resume", "--quiet", "--device", "cpu", *TINY, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert ne.ElasticModel.load(out / "elastic.pt").num_levels == 4
    assert yaml.safe_load((out / "recipe.yaml").read_text())["elastic"]["widths"] == [0.25, 0.5, 0.75, 1.0]
    assert not list(out.rglob("*.tmp"))  # the stale temporary file is gone


def test_python_resume_refuses_changed_settings(digits, tmp_path):
    fast = dict(pretrain_epochs=1, prune_steps=1, finetune_epochs=1, grow_epochs=1, calibrate_batches=1, quiet=True,
                checkpoint_dir=tmp_path)

    def stop(info):
        raise Interrupt

    with pytest.raises(Interrupt):
        ne.PruneAndGrow(widths=(0.5, 1.0), **fast, on_step_end=stop).fit(
            ne.create_model("resnet20", in_channels=1), digits.train, digits.val)
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match=r"resume: .*pretrain.pt was written with other settings \(widths: "):
        ne.PruneAndGrow(widths=(0.25, 1.0), **fast).fit(ne.create_model("resnet20", in_channels=1), digits.train,
                                                        digits.val, resume=True)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("args, fragments", [
    (["search", "{ckpt}", "--trials", "0"], ["--trials", "positive integer"]),
    (["search", "{ckpt}", "--trials", "-3"], ["--trials"]),
    (["levels", "{ckpt}", "--widths", "0.5,1.0"], ["--widths", "{ckpt}", "drop --widths"]),
    (["levels", "{ckpt}", "--model", "vgg16_bn"], ["--model", "{ckpt}"]),
])
def test_cli_rejects_arguments_that_would_be_ignored(args, fragments, small_checkpoint, tmp_path):
    fill = lambda s: s.format(ckpt=small_checkpoint)  # noqa: E731
    proc = cli(*map(fill, args), cwd=tmp_path)
    assert_one_line_error(proc, *map(fill, fragments))
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("name", ["tpe", "random", "nsga2"])
def test_seeded_studies_never_repeat_a_draw(name, tmp_path):
    """Resuming a study with the same seed, or a second process on it with the same seed, draws new parameters."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    objectives = 1 if name != "nsga2" else 2

    def objective(trial):
        x, y = trial.suggest_float("x", -1, 1), trial.suggest_float("y", -1, 1)
        return (x * x + y,) * objectives if objectives > 1 else x * x + y

    def params(study):
        return [tuple(t.params.values()) for t in study.trials]

    directions = ["minimize"] * objectives
    first = optuna.create_study(storage=url, study_name="s", directions=directions,
                                sampler=make_sampler(name, objectives, seed=0, n_trials=8))
    first.optimize(objective, n_trials=4)
    resumed = optuna.load_study(storage=url, study_name="s", sampler=make_sampler(name, objectives, seed=0, n_trials=8))
    other = optuna.load_study(storage=url, study_name="s", sampler=make_sampler(name, objectives, seed=0, n_trials=8))
    for _ in range(2):  # two "processes" with one seed, interleaved on one storage
        for study in (resumed, other):
            trial = study.ask()
            study.tell(trial, objective(trial))
    drawn = params(optuna.load_study(storage=url, study_name="s"))
    assert len(drawn) == 8 and len(set(drawn)) == 8, drawn
    # and a study stays reproducible from its seed
    again = optuna.create_study(directions=directions, sampler=make_sampler(name, objectives, seed=0, n_trials=8))
    again.optimize(objective, n_trials=4)
    assert params(again) == drawn[:4]


# ---------------------------------------------------------------------- 3. one line instead of a traceback
@pytest.mark.parametrize("command", ["levels", "search"])
@pytest.mark.parametrize("kind", ["text", "truncated", "empty"])
def test_unreadable_checkpoint_is_one_line(command, kind, small_checkpoint, tmp_path):
    path = tmp_path / "bad.pt"
    if kind == "text":
        path.write_text("model: resnet20\n")
    elif kind == "truncated":
        data = small_checkpoint.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(b"")
    proc = cli(command, str(path), *(["--no-latency"] if command == "levels" else ["--trials", "1"]), cwd=tmp_path)
    assert_one_line_error(proc, str(path), "not a readable nni-elastic", "(truncated or not a checkpoint?)")


def _read_only_dir(tmp_path: Path) -> Path:
    if os.geteuid() == 0:  # root writes through file modes; sysfs refuses new entries even to root
        path = Path("/sys/nni-elastic-export")
        try:
            path.mkdir()
        except OSError:
            return path
        path.rmdir()
        pytest.skip("no read-only directory available to root here")
    path = tmp_path / "ro"
    path.mkdir()
    path.chmod(stat.S_IRUSR | stat.S_IXUSR)
    return path


@pytest.mark.parametrize("where", ["read_only", "under_file", "file"])
def test_export_to_an_unwritable_out_is_one_line(where, small_checkpoint, tmp_path):
    (tmp_path / "a_file").write_text("x")
    out = {"read_only": lambda: _read_only_dir(tmp_path), "under_file": lambda: tmp_path / "a_file" / "exports",
           "file": lambda: tmp_path / "a_file"}[where]()
    proc = cli("export", str(small_checkpoint), "--out", str(out), cwd=tmp_path)
    fragment = {"read_only": "is not writable", "under_file": "is under the file", "file": "is a file"}[where]
    assert_one_line_error(proc, f"--out {str(out)!r}", fragment, "choose")
    assert (tmp_path / "a_file").read_text() == "x"


def test_run_out_pointing_at_a_file_is_one_line(tmp_path):
    (tmp_path / "results").write_text("keep me")
    proc = cli("run", str(RECIPE), "--out", str(tmp_path / "results"), "--quiet", *TINY, cwd=tmp_path)
    assert_one_line_error(proc, str(tmp_path / "results"), "is a file", "--out")
    assert (tmp_path / "results").read_text() == "keep me"


@pytest.mark.parametrize("override, fragments", [
    ("elastic.widths=[0.25,", ["--set elastic.widths=[0.25,", "not valid YAML"]),
    ("model.kwargs={depth: 7}", ["'depth'", "resnet20", "num_classes, in_channels, width_multiplier"]),
])
def test_bad_override_is_one_line(override, fragments, tmp_path):
    out = tmp_path / "run"
    proc = cli("run", str(RECIPE), "--out", str(out), "--quiet", "--set", override, cwd=tmp_path)
    assert_one_line_error(proc, *fragments)
    assert not out.exists()


def test_expansion_score_names_an_out_of_range_label():
    model = ne.create_model("growable_cnn", in_channels=1, channels=[4], blocks=[0])
    with pytest.raises(ValueError, match=r"label 12, but the model has 10 classes \(labels 0..9\)"):
        ne.natural_expansion_score(model, torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 12, 3]))


def test_load_state_dict_with_another_number_of_levels_names_both(small_checkpoint):
    three = ne.ElasticModel(ne.create_model("resnet20", in_channels=1), torch.zeros(1, 1, 8, 8), widths=(0.25, 0.5, 1.0))
    two = ne.ElasticModel.load(small_checkpoint)
    with pytest.raises(ValueError, match=r"holds 2 levels .* this ElasticModel has 3; .*ElasticModel.load\(path\)"):
        three.load_state_dict(two.state_dict())
    with pytest.raises(ValueError, match=r"whole elastic checkpoint; use ElasticModel.load"):
        three.load_state_dict(torch.load(small_checkpoint, weights_only=True))
    same = ne.ElasticModel.load(small_checkpoint)
    same.load_state_dict(two.state_dict())  # same levels: loads as usual


# ---------------------------------------------------------------------- 4. housekeeping
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664)])
def test_files_follow_the_umask_and_stale_temporaries_go(umask, mode, tmp_path):
    dead = 999_999_999  # above any pid_max: no such process
    stale = tmp_path / f".elastic.pt.{dead}.x1y2.tmp"
    stale.write_bytes(b"half a checkpoint")
    live = tmp_path / f".elastic.pt.{os.getpid()}.x1y2.tmp"  # this process may be writing it
    live.write_bytes(b"in progress")
    old = os.umask(umask)
    try:
        em = ne.ElasticModel(ne.create_model("resnet20", in_channels=1), torch.zeros(1, 1, 8, 8), widths=(0.5, 1.0))
        em.save(tmp_path / "elastic.pt")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "elastic.pt").stat().st_mode) == mode
    assert not stale.exists() and live.exists()
