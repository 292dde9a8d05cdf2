"""Prune-and-grow on digits: nested levels, frozen core, accuracy, resume, errors, CLI."""
from __future__ import annotations

import json

import pytest
import torch

import nni_elastic as ne
from nni_elastic.cli import main
from nni_elastic.training import evaluate_levels
from elastic_utils import digits_resnet20 as fresh_model

FAST = dict(widths=(0.25, 0.5, 1.0), pretrain_epochs=2, prune_steps=2, finetune_epochs=1, grow_epochs=1,
            batch_size=32, calibrate_batches=4, quiet=True)
# for accuracy assertions: one fine-tuning epoch after halving the width leaves a level near chance
# (val accuracy ~0.3), where float summation order (the torch thread count) decided pass or fail;
# three epochs bring every level above 0.8 with 1 and 2 threads alike
TRAINED = FAST | dict(finetune_epochs=3)
# bit-exact reproduction (resume) is a CPU property: CUDA kernels (atomic adds in some backward
# passes, TF32 convolutions chosen per batch shape) may differ from run to run
EXACT = FAST | dict(device="cpu")


@pytest.fixture(scope="module")
def digits():
    return ne.data.load_dataset("digits", limit=500)


def level_weights(em: ne.ElasticModel, level: int) -> dict[str, torch.Tensor]:
    masks = em.parameter_masks(level)
    return {n: p.detach()[masks[n]].clone() for n, p in em.model.named_parameters()}


@pytest.fixture(scope="module")
def frozen_run(digits):
    snapshots = {}
    pg = ne.PruneAndGrow(grow_mode="freeze", **TRAINED)

    def snapshot(info):
        em = pg.elastic_model_
        if em is not None:
            snapshots[info.name] = {lv: level_weights(em, lv) for lv in range(em.num_levels)}

    pg.on_step_end = snapshot
    result = pg.fit(fresh_model(), digits.train, digits.val)
    assert isinstance(result, ne.StrategyResult) and result.rows == pg.report()
    em = result.elastic_model
    return pg, em, snapshots


def test_plan_prunes_to_the_core_then_grows_every_level():
    pg = ne.PruneAndGrow(widths=(0.25, 0.5, 0.75, 1.0), prune_steps=5, pretrain_epochs=1)
    kinds = [s.kind for s in pg.plan()]
    assert kinds == ["pretrain", "wrap"] + ["prune"] * 5 + ["grow"] * 3 + ["calibrate"]
    path = pg.prune_path()
    assert path == sorted(path, reverse=True) and {0.75, 0.5, 0.25} <= set(path) and len(path) == 5


def test_frozen_core_and_smaller_levels_stay_bit_identical(frozen_run):
    pg, em, snaps = frozen_run
    core_after_pruning = snaps[[k for k in snaps if k.startswith("prune_")][-1]][0]
    final_core = level_weights(em, 0)
    for name, value in core_after_pruning.items():
        assert torch.equal(value, final_core[name]), name
    grow_steps = [k for k in snaps if k.startswith("grow_")]
    level1_after_its_growth = snaps[grow_steps[0]][1]
    for name, value in level1_after_its_growth.items():
        assert torch.equal(value, level_weights(em, 1)[name]), name


def test_levels_are_nested_prefixes(frozen_run):
    _, em, _ = frozen_run
    small, large = em.export(0), em.export(1)
    large_modules = dict(large.named_modules())
    for name, m in small.named_modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            big = large_modules[name].weight
            k_out, k_in = m.weight.shape[:2]
            assert torch.equal(m.weight, big[:k_out, :k_in]), name


def test_every_level_beats_chance_and_report_is_complete(frozen_run, digits):
    pg, em, _ = frozen_run
    rows = pg.report()
    assert [r["width"] for r in rows] == [0.25, 0.5, 1.0]
    assert all(r["accuracy"] > 0.5 for r in rows), rows  # chance is 0.1
    assert rows[0]["macs"] < rows[1]["macs"] < rows[2]["macs"]
    measured = [r["accuracy"] for r in evaluate_levels(em, digits.val)]
    assert measured == pytest.approx([r["accuracy"] for r in rows])
    assert pg.compute_["full_epochs"] > FAST["pretrain_epochs"]


def test_joint_mode_trains_only_inside_the_grown_level(digits):
    outside = {}
    pg = ne.PruneAndGrow(grow_mode="joint", **FAST)

    def watch(info):
        em = pg.elastic_model_
        if em is None:
            return
        if info.name.startswith("prune_2"):  # the core is built: remember what level 1 does not use
            masks = em.parameter_masks(1)
            outside.update({n: p.detach()[~masks[n]].clone() for n, p in em.model.named_parameters()})
        if info.name.startswith("grow_1"):
            masks = em.parameter_masks(1)
            for n, p in em.model.named_parameters():
                assert torch.equal(p.detach()[~masks[n]], outside[n]), n

    pg.on_step_end = watch
    pg.fit(fresh_model(), digits.train, digits.val)
    assert outside and all(r["accuracy"] > 0.5 for r in pg.report())


class Interrupt(Exception):
    pass


def test_resume_skips_finished_steps_and_reproduces_the_uninterrupted_run(digits, tmp_path):
    reference = ne.PruneAndGrow(grow_mode="freeze", **EXACT, checkpoint_dir=tmp_path / "a").fit(fresh_model(), digits.train, digits.val).elastic_model

    def stop_after_prune(info):
        if info.name.startswith("prune_1"):
            raise Interrupt

    with pytest.raises(Interrupt):
        ne.PruneAndGrow(grow_mode="freeze", **EXACT, checkpoint_dir=tmp_path / "b", on_step_end=stop_after_prune).fit(
            fresh_model(), digits.train, digits.val)
    ran = []
    resumed_pg = ne.PruneAndGrow(grow_mode="freeze", **EXACT, checkpoint_dir=tmp_path / "b", on_step_end=lambda i: ran.append(i.name))
    resumed = resumed_pg.fit(fresh_model(seed=123), digits.train, digits.val, resume=True).elastic_model
    names = [s.name for s in resumed_pg.plan()]
    first_left = names.index([n for n in names if n.startswith("prune_1")][0]) + 1
    assert ran == names[first_left:]  # nothing finished before the interruption ran again
    ref_state, res_state = reference.state_dict(), resumed.state_dict()
    assert ref_state.keys() == res_state.keys()
    for key in ref_state:
        assert torch.allclose(ref_state[key].float(), res_state[key].float(), atol=1e-6), key


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_resume_on_cuda_runs_the_remaining_steps_on_the_device(digits, tmp_path):
    def stop_after_prune(info):
        if info.name.startswith("prune_1"):
            raise Interrupt

    with pytest.raises(Interrupt):
        ne.PruneAndGrow(grow_mode="freeze", **FAST, device="cuda", checkpoint_dir=tmp_path,
                        on_step_end=stop_after_prune).fit(fresh_model(), digits.train, digits.val)
    ran = []
    pg = ne.PruneAndGrow(grow_mode="freeze", **FAST, device="cuda", checkpoint_dir=tmp_path, on_step_end=lambda i: ran.append(i.name))
    em = pg.fit(fresh_model(seed=123), digits.train, digits.val, resume=True).elastic_model
    names = [s.name for s in pg.plan()]
    assert ran == names[names.index([n for n in names if n.startswith("prune_1")][0]) + 1:]
    assert all(p.is_cuda for p in em.parameters())
    assert [r["accuracy"] for r in evaluate_levels(em, digits.val)][-1] > 0.5  # levels evaluated where they live


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(grow_mode="frozen"), "grow_mode='frozen'"),
        (dict(regrow="random"), "regrow='random'"),
        (dict(widths=()), "widths must not be empty"),
        (dict(widths=(0.5, 0.25)), "strictly increasing"),
        (dict(widths=(0.25, 0.5, 1.0), prune_steps=1), "prune_steps=1"),
        (dict(importance="magic"), "unknown importance 'magic'"),
        (dict(lr=-1.0), "lr=-1.0"),
        (dict(grow_epochs=-1), "grow_epochs=-1"),
    ],
)
def test_bad_parameters_give_clear_errors(kwargs, fragment):
    with pytest.raises(ValueError, match=None) as err:
        ne.PruneAndGrow(**kwargs)
    assert fragment in str(err.value)


def test_resume_needs_a_checkpoint_dir(digits):
    with pytest.raises(ValueError, match="checkpoint_dir"):
        ne.PruneAndGrow(**FAST).fit(fresh_model(), digits.train, digits.val, resume=True)


def test_cli_run_writes_outputs_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["run", "strategies/prune_and_grow/digits.yaml", "--out", str(out), "--quiet",
            "--set", "data.limit=300", "--set", "strategy.pretrain_epochs=1", "--set", "strategy.prune_steps=3",
            "--set", "strategy.finetune_epochs=1", "--set", "strategy.grow_epochs=1"]
    assert main(argv) == 0
    table = json.loads((out / "levels.json").read_text())
    assert len(table["levels"]) == 4 and all(r["latency_ms"] > 0 for r in table["levels"])
    assert (out / "accuracy_vs_macs.png").is_file() and (out / "recipe.yaml").is_file()
    assert sorted(p.name for p in (out / "exports").glob("*.ts")) == [f"level{i}.ts" for i in range(4)]
    em = ne.ElasticModel.load(out / "elastic.pt")
    assert em.num_levels == 4
    # a finished run resumes instantly: every step is recorded as done
    assert main(argv + ["--resume"]) == 0


def test_cli_run_reports_recipe_errors(tmp_path, capsys):
    assert main(["run", "strategies/prune_and_grow/digits.yaml", "--set", "strategy.grow_mode=frozen", "--quiet"]) == 2
    assert "strategy.grow_mode: 'frozen' is not one of ['freeze', 'joint']" in capsys.readouterr().err
    assert main(["run", "strategies/prune_and_grow/cifar10_resnet20.yaml", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "data.root" in err and "cifar-10-batches-py" in err
