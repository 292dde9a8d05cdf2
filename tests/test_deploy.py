"""Levels at deployment speed: deploy exports and prepared levels compute what the plain exports compute.

No timings here (they are in benchmarks/bench_deploy.py): outputs, folding, freshness after
training, formats and errors.
"""
from __future__ import annotations

import copy
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

from elastic_utils import ZOO, batch, perturb_bn, rel_diff
from nni_elastic import ElasticModel, create_model
from nni_elastic.deploy import deploy, fold_pairs

WIDTHS = (0.25, 0.5, 1.0)


def _wrapped(name: str) -> tuple[ElasticModel, torch.Tensor]:
    torch.manual_seed(0)
    x = batch(3)
    model = create_model(name, num_classes=10, in_channels=3)
    perturb_bn(model, x)
    return ElasticModel(model, x[:1], widths=WIDTHS).eval(), x


@pytest.fixture(scope="module")
def zoo(one_thread):
    return {name: _wrapped(name) for name in ZOO}


@pytest.mark.parametrize("name", ZOO)
def test_deploy_export_equals_plain_export(zoo, name: str) -> None:
    em, x = zoo[name]
    with torch.no_grad():
        for level in range(em.num_levels):
            plain = em.export(level)
            for fmt in ("contiguous", "channels_last"):
                deployed = em.export(level, deploy=True, memory_format=fmt)
                xd = x.contiguous(memory_format=torch.channels_last) if fmt == "channels_last" else x
                assert rel_diff(deployed(xd), plain(x)) <= 1e-4, (name, level, fmt)
        folded = {bn for _, bn in deployed.nni_elastic_deploy["folded"]}
        assert all(not isinstance(deployed.get_submodule(bn), nn.modules.batchnorm._BatchNorm) for bn in folded)


def test_folding_removes_every_batchnorm_after_a_conv() -> None:
    em, x = _wrapped("resnet20")
    plain = em.export(0)
    pairs = fold_pairs(plain, x[:1])
    bns = [n for n, m in plain.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert sorted(bn for _, bn in pairs) == sorted(bns)  # ResNet-20: every BatchNorm follows a conv
    deployed = deploy(plain, x, memory_format="contiguous")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in deployed.modules())
    assert deployed.nni_elastic_deploy == {"folded": [list(p) for p in pairs], "memory_format": "contiguous", "compiled": False}


def test_a_batchnorm_subclass_or_shared_output_is_not_folded() -> None:
    class BNAct(nn.BatchNorm2d):
        def forward(self, x):
            return torch.relu(super().forward(x))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), BNAct(8)
            self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            x = self.b1(self.c1(x))
            y = self.c2(x)
            return self.fc((self.b2(y) + y).mean((2, 3)))  # c2's output is read twice

    net = Net().eval()
    assert fold_pairs(net, torch.randn(1, 3, 8, 8)) == []


@pytest.mark.parametrize("lazy", [False, True])
def test_prepared_levels_equal_their_exports(zoo, lazy: bool) -> None:
    em, x = zoo["resnet20"]
    em = copy.deepcopy(em)
    info = em.prepare_inference(lazy=lazy, memory_format="auto", batch_size=4)
    assert (info["levels"] == 0) if lazy else (info["levels"] == em.num_levels and info["bytes"] > 0)
    with torch.inference_mode():
        for level in range(em.num_levels):
            em.set_level(level)
            assert rel_diff(em(x), em.export(level)(x)) <= 1e-4
    assert em.inference_memory()["levels"] == em.num_levels


def test_prepared_forms_go_stale_when_weights_change_and_are_rebuilt(zoo) -> None:
    em, x = zoo["mobilenetv2_tiny"]
    em = copy.deepcopy(em)
    em.prepare_inference(memory_format="contiguous")
    with torch.no_grad():
        before = em.set_level(0) or em(x)
    opt = torch.optim.SGD(em.parameters(), lr=0.5)
    em.train()
    em(x).square().mean().backward()  # a training forward never uses the prepared forms
    opt.step()
    em.eval()
    with torch.no_grad():
        after = em.export(0)(x)
        assert rel_diff(after, before) > 1e-3  # the step changed level 0
        assert rel_diff(em.model(x), after) <= 1e-4  # a direct call runs the sliced forward
        assert rel_diff(em(x), after) <= 1e-4  # and em(x) rebuilt the stale form
        for m in em.model.modules():  # statistics changed in place: stale again
            for name in ("level_running_var", "running_var"):
                if isinstance(m._buffers.get(name), torch.Tensor):
                    m._buffers[name].mul_(2.0)
        assert rel_diff(em(x), em.export(0)(x)) <= 1e-4


def test_a_prepared_level_runs_its_deploy_export(zoo) -> None:
    em, x = zoo["resnet20"]
    em = copy.deepcopy(em)
    em.prepare_inference(memory_format="channels_last", batch_size=4)
    deployed = em.export(1, deploy=True, memory_format="channels_last")
    with torch.inference_mode():
        em.set_level(1)
        out = em(x)  # a contiguous input is converted, as the deploy export is fed
        assert torch.equal(out, deployed(x.contiguous(memory_format=torch.channels_last)))
    info = em.inference_memory()
    assert info["memory_format"] == {i: "channels_last" for i in range(em.num_levels)}
    sizes = sum(sum(t.numel() * t.element_size() for t in em.export(i, deploy=True, memory_format="contiguous").state_dict().values())
                for i in range(em.num_levels))
    assert info["bytes"] == sizes  # the sum of the levels' deployed sizes
    clone = copy.deepcopy(em)  # a copy keeps the settings, not the forms
    assert clone.inference_memory()["levels"] == 0
    with torch.inference_mode():
        clone.set_level(1)
        assert torch.equal(clone(x), out)


def test_ad_hoc_level_is_prepared_on_use(zoo) -> None:
    em, x = zoo["vgg16_bn"]
    em = copy.deepcopy(em)
    em.prepare_inference(memory_format="contiguous")
    with torch.no_grad():
        em.set_level(0.75)
        assert rel_diff(em(x), em.export()(x)) <= 1e-4
        em.set_level({em.graph.names[0]: 0.5})
        assert rel_diff(em(x), em.export()(x)) <= 1e-4


def test_a_deep_copy_still_ranks_and_reorders() -> None:
    em, x = _wrapped("resnet20")
    twin = copy.deepcopy(em)
    with torch.no_grad():
        before = twin(x)
    twin.reorder("l2")
    with torch.no_grad():
        assert rel_diff(twin(x), before) <= 1e-5


def test_bad_deploy_settings_are_refused(zoo, tmp_path) -> None:
    em, x = zoo["resnet20"]
    with pytest.raises(ValueError, match="memory_format='fast'.*auto"):
        em.export(0, deploy=True, memory_format="fast")
    with pytest.raises(ValueError, match="memory_format='sideways'"):
        copy.deepcopy(em).prepare_inference(memory_format="sideways")
    ckpt = tmp_path / "elastic.pt"
    em.save(ckpt)
    out = tmp_path / "exports"
    proc = subprocess.run(
        [sys.executable, "-m", "nni_elastic.cli", "export", str(ckpt), "--out", str(out), "--deploy", "--formats", "state"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2 and "deploy exports cannot be written as ['state']" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not out.exists()


def test_deploy_exports_are_written_and_load_without_pickles(zoo, tmp_path) -> None:
    em, x = zoo["resnet20"]
    ckpt = tmp_path / "elastic.pt"
    em.save(ckpt)
    out = tmp_path / "exports"
    proc = subprocess.run(
        [sys.executable, "-m", "nni_elastic.cli", "export", str(ckpt), "--out", str(out), "--deploy",
         "--formats", "pt2", "--batch-size", "4", "--quiet"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
    program = torch.export.load(out / "level0.pt2")
    with torch.no_grad():
        assert rel_diff(program.module()(x), em.export(0)(x)) <= 1e-4


def test_latency_measured_in_its_form_is_cached_and_saved(tmp_path) -> None:
    from nni_elastic.elastic import latency_key

    em, x = _wrapped("resnet20")
    assert em.pick_level(max_latency_ms=1e9, batch_size=2) == em.num_levels - 1  # deploy form by default
    key = latency_key("cpu", 2, "deploy")
    assert all(key in lv.latency for lv in em.levels)
    em.save(tmp_path / "elastic.pt")
    loaded = ElasticModel.load(tmp_path / "elastic.pt")
    assert [lv.latency for lv in loaded.levels] == [lv.latency for lv in em.levels]
    for lv in loaded.levels:  # values no real measurement gives: picking must read the saved ones
        lv.latency[key] = 0.001 if lv.index == 0 else 1e6
    assert loaded.pick_level(max_latency_ms=1.0, batch_size=2) == 0
    with pytest.raises(ValueError, match="form='fastest'"):
        loaded.measure_latency(0, form="fastest")


@pytest.mark.slow
def test_compiled_deploy_export_equals_plain_export() -> None:
    """torch.compile (inductor needs a C++ compiler: gcc in CI) on a deploy export, or a clear fallback."""
    em, x = _wrapped("resnet20")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = em.export(0, deploy=True, compile=True, memory_format="contiguous")
    info = compiled.nni_elastic_deploy
    assert info["compiled"] or any("torch.compile failed" in str(w.message) for w in caught)
    with torch.no_grad():
        assert rel_diff(compiled(x), em.export(0)(x)) <= 1e-4


def test_moving_the_model_drops_prepared_forms_and_rebuilds_them(zoo) -> None:
    em, x = zoo["resnet20"]
    em = copy.deepcopy(em)
    em.prepare_inference(memory_format="contiguous")
    em.double()  # a dtype change stands in for a device move: old forms must not be used
    assert em.inference_memory()["levels"] == 0
    with torch.no_grad():
        em.set_level(0)
        assert rel_diff(em(x.double()), em.export(0)(x.double())) <= 1e-6
