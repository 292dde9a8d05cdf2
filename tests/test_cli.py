"""The command line as a user runs it: the main job on digits, level tables, exports, errors."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from nni_elastic import ElasticModel, load_compact
from nni_elastic.cli import main


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    rc = main(["train", "--epochs", "2", "--limit", "400", "--widths", "0.25,0.5,1.0", "--out", str(out), "--quiet"])
    assert rc == 0
    return out


def test_train_writes_checkpoint_exports_table_and_plot(trained_run):
    table = json.loads((trained_run / "levels.json").read_text())
    rows = table["levels"]
    assert [r["width"] for r in rows] == [0.25, 0.5, 1.0]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
    assert rows[-1]["accuracy"] > 0.3  # 10 classes: clearly above chance after two epochs
    macs = [r["macs"] for r in rows]
    assert macs == sorted(macs) and len(set(macs)) == len(macs)
    assert (trained_run / "accuracy_vs_macs.png").stat().st_size > 1000
    for i in range(3):
        assert (trained_run / "exports" / f"level{i}.state.pt").is_file()
        assert (trained_run / "exports" / f"level{i}.ts").is_file()
        assert not (trained_run / "exports" / f"level{i}.pt").exists()  # pickled modules only on request


def test_exports_match_checkpoint_levels(trained_run):
    em = ElasticModel.load(trained_run / "elastic.pt").eval()
    x = torch.randn(5, *em.example_shape[1:])
    for i in range(em.num_levels):
        em.set_level(i)
        scripted = torch.jit.load(str(trained_run / "exports" / f"level{i}.ts"))
        pickled = load_compact(trained_run / "exports" / f"level{i}.state.pt")
        with torch.no_grad():
            ref = em(x)
            assert torch.allclose(scripted(x), ref, atol=1e-5)
            assert torch.allclose(pickled(x), ref, atol=1e-5)


def test_levels_command_prints_table_from_checkpoint(trained_run, capsys):
    assert main(["levels", str(trained_run / "elastic.pt"), "--json", "--no-latency"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 3 and rows[0]["macs"] < rows[-1]["macs"]
    assert "accuracy" in rows[0]


def test_levels_command_measures_latency_for_zoo_model(capsys):
    assert main(["levels", "--model", "resnet20", "--in-channels", "1", "--input-size", "8", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert all(r["latency_ms"] > 0 for r in rows)


def test_export_command_writes_onnx(trained_run, tmp_path):
    onnx = pytest.importorskip("onnx")
    assert main(["export", str(trained_run / "elastic.pt"), "--out", str(tmp_path), "--formats", "onnx", "--quiet"]) == 0
    files = sorted(tmp_path.glob("*.onnx"))
    assert len(files) == 3
    onnx.checker.check_model(onnx.load(str(files[0])))


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["train", "--model", "resnet21"], "unknown model 'resnet21'"),
        (["train", "--widths", "0.5,1.5"], "1.5"),
        (["train", "--data", "fashion_mnist", "--data-root", "/no/such/dir"], "/no/such/dir"),
        (["levels", "/no/such/elastic.pt"], "/no/such/elastic.pt"),
        (["export", "--model", "resnet20", "--out", "x", "--formats", "tflite"], "tflite"),
    ],
)
def test_bad_input_gives_clear_error(argv, fragment, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv + ["--quiet"]) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "nni_elastic.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "train" in out.stdout
