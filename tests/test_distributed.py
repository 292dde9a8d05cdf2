"""Training on several processes (torchrun, gloo on CPU): weights, statistics and metrics agree across ranks."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nni_elastic.training import evaluate

sys.path.insert(0, str(Path(__file__).parent))
from ddp_worker import SmallNet, data  # noqa: E402

WORKER = Path(__file__).with_name("ddp_worker.py")


def torchrun(args: list[str], *, check_sync: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, NNI_ELASTIC_CHECK_SYNC="1" if check_sync else "0", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def run_worker(tmp_path: Path, mode: str) -> tuple[dict, dict]:
    proc = torchrun([str(WORKER), str(tmp_path), mode])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return (torch.load(tmp_path / "rank0.pt", weights_only=True), torch.load(tmp_path / "rank1.pt", weights_only=True))


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_elastic_training_on_two_processes_keeps_ranks_identical(tmp_path):
    r0, r1 = run_worker(tmp_path, "elastic")
    assert r0["world"] == r1["world"] == 2
    assert_same_state(r0["state"], r1["state"])  # weights and every level's BatchNorm rows
    assert any("level_running_mean" in k for k in r0["state"])
    assert r0["history"] == r1["history"] and len(r0["history"]) == 2
    assert r0["evaluate"] == r1["evaluate"]


def test_growth_mid_run_is_rewrapped_and_sharded_evaluation_equals_whole_set(tmp_path):
    r0, r1 = run_worker(tmp_path, "grow")
    assert_same_state(r0["state"], r1["state"])
    model = SmallNet()
    model.load_state_dict(r0["state"])
    whole = evaluate(model, data(40, 1), device="cpu")
    assert whole["accuracy"] == r0["evaluate"]["accuracy"]
    assert whole["loss"] == pytest.approx(r0["evaluate"]["loss"], rel=1e-5)
    # the BatchNorm statistics are the mean over the ranks, not rank 0's: they moved from their start
    assert not torch.equal(r0["state"]["bn.running_mean"], torch.zeros(8))


def test_nested_history_levels_stay_identical_across_ranks(tmp_path):
    r0, r1 = run_worker(tmp_path, "nested")
    assert r0["levels"] == r1["levels"] >= 1
    # the levels' own BatchNorm weights (outside DistributedDataParallel) and statistics agree too
    assert any(k.startswith("level0.") and k.endswith(".bn.weight") for k in r0["state"])
    assert any(k.startswith("level0.") and k.endswith("running_mean") for k in r0["state"])
    assert_same_state(r0["state"], r1["state"])


def test_a_decision_taken_on_one_rank_only_is_caught(tmp_path):
    proc = torchrun([str(WORKER), str(tmp_path), "diverge"])
    assert proc.returncode != 0
    assert "rank 1 diverged from rank 0 after step 2 in conv.weight" in proc.stdout + proc.stderr


# ---------------------------------------------------------------------- the command line, end to end
REPO = Path(__file__).resolve().parents[1]
PNG_RECIPE = REPO / "strategies" / "prune_and_grow" / "digits.yaml"
GROWTH_RECIPE = REPO / "strategies" / "expansion_growth" / "digits.yaml"


def cli(args: list[str], *, timeout: float = 900, **popen) -> subprocess.CompletedProcess:
    env = dict(os.environ, NNI_ELASTIC_CHECK_SYNC="1")
    return subprocess.run([sys.executable, "-m", "nni_elastic.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, **popen)


def level_accuracy(out: Path) -> list[float]:
    import json

    return [row["accuracy"] for row in json.loads((out / "levels.json").read_text())["levels"]]


@pytest.mark.slow
def test_prune_and_grow_on_two_processes_matches_one_process(tmp_path):
    two = cli(["run", str(PNG_RECIPE), "--nproc", "2", "--out", str(tmp_path / "two"), "--quiet"])
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    one = cli(["run", str(PNG_RECIPE), "--out", str(tmp_path / "one"), "--quiet"])
    assert one.returncode == 0, one.stderr[-3000:]
    for name in ("elastic.pt", "levels.json", "accuracy_vs_macs.png", "exports/level0.ts"):
        assert (tmp_path / "two" / name).is_file(), name
    a2, a1 = level_accuracy(tmp_path / "two"), level_accuracy(tmp_path / "one")
    assert len(a2) == len(a1) == 4
    # 360 validation digits: one sample is 0.28 pp; two runs of one process differ by a few samples too
    for lo, hi in zip(a2, a1):
        assert abs(lo - hi) <= 0.04, (a2, a1)
    assert min(a2) > 0.85


@pytest.mark.slow
def test_expansion_growth_on_two_processes_grows_identically(tmp_path):
    out = tmp_path / "grow"
    proc = cli(["run", str(GROWTH_RECIPE), "--nproc", "2", "--out", str(out), "--quiet"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    import json

    record = json.loads((out / "levels.json").read_text())
    assert len(record["expansions"]) >= 1  # rank 0's decisions, applied on both ranks (the sync check passed)
    assert all(Path(c["path"]).is_file() for c in record["checkpoints"])


@pytest.mark.slow
def test_two_process_run_resumes_after_a_kill(tmp_path):
    import signal
    import time

    out = tmp_path / "run"
    args = [sys.executable, "-m", "nni_elastic.cli", "run", str(PNG_RECIPE), "--nproc", "2", "--out", str(out),
            "--quiet", "--verbose"]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    checkpoint = out / "checkpoints" / "elastic.pt"
    try:
        deadline = time.time() + 600
        while not checkpoint.is_file() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        assert checkpoint.is_file(), "no elastic checkpoint was written"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both workers
        proc.wait()
    assert not (out / "levels.json").exists()
    resumed = cli(["run", str(PNG_RECIPE), "--nproc", "2", "--out", str(out), "--resume", "--verbose"])
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "pretrain epoch" not in resumed.stderr  # the finished steps were not run again
    assert "grow level 3 epoch" in resumed.stderr
    assert len(level_accuracy(out)) == 4


@pytest.mark.slow
def test_an_nni_trial_can_be_a_torchrun_job(tmp_path):
    out = tmp_path / "trial"
    env = dict(os.environ, NNI_ELASTIC_CHECK_SYNC="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "nni_elastic.nni.trial",
           "--recipe", str(PNG_RECIPE), "--set", "strategy.pretrain_epochs=1", "--set", "strategy.finetune_epochs=1",
           "--set", "strategy.grow_epochs=1", "--out", str(out), "--quiet"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("final metric:") == 1  # rank 0 reports; rank 1 only trains
    import json

    metric = json.loads((out / "metrics.json").read_text())["metric"]
    assert metric["levels"] == 4 and metric["acc_level0"] > 0.5


RANK_FAILS = '''
from dataclasses import dataclass
import nni_elastic as ne
from nni_elastic import distributed as dist
from nni_elastic.options import option


@dataclass
class RankFailsOptions:
    epochs: int = option(1, ge=0)


@ne.register_strategy("rank_fails")
class RankFails(ne.Strategy):
    Options = RankFailsOptions

    def fit(self, model, train_data, val_data, *, resume=False, example_inputs=None):
        if dist.rank() == 1:
            raise RuntimeError("rank 1 fails on purpose")
        dist.from_main({"rank 0": "still working"})  # a collective the failed rank never joins
        raise AssertionError("rank 0 should have been stopped")
'''


def test_an_nni_trial_whose_rank_fails_ends_instead_of_waiting(tmp_path):
    """A rank that raises leaves the job (torchrun then stops the others); it does not wait at a barrier
    while another rank is inside a collective (that waited until gloo's 30-minute timeout)."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "ne_rank_fails.py").write_text(RANK_FAILS)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method: rank_fails\nplugins: [ne_rank_fails]\ndevice: cpu\ndata: {name: digits, limit: 200}\n"
                      "model: {name: growable_cnn, kwargs: {channels: [4, 8, 8], blocks: [0, 0, 0]}}\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(plugins), str(REPO), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "nni_elastic.nni.trial", "--recipe", str(recipe), "--out", str(tmp_path / "out"), "--quiet"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode != 0
    assert "rank 1 fails on purpose" in proc.stdout + proc.stderr
