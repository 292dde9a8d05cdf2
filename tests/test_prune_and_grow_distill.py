"""Prune-and-grow's distillation from the trained full network (``distill``): targets, compute, resume, fallback."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import nni_elastic as ne
from nni_elastic.checkpoint import CheckpointError, read_checkpoint
from nni_elastic.config import RecipeError, load_recipe
from nni_elastic.training import FORWARD_COST, IndexedDataset, distill_step, predictions
from elastic_utils import digits_resnet20 as fresh_model

FAST = dict(widths=(0.5, 1.0), pretrain_epochs=1, prune_steps=1, finetune_epochs=1, grow_epochs=1,
            grow_mode="freeze", batch_size=32, calibrate_batches=2, quiet=True,
            device="cpu")  # exact comparisons: CUDA's TF32 convolutions differ by batch shape


class Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def digits():
    return ne.data.load_dataset("digits", limit=200)


def grads_of(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_distill_step_from_logits_equals_the_teacher_run_per_batch_and_mixes_the_labels(digits):
    teacher, student = fresh_model(1).eval(), fresh_model(2)
    targets = predictions(teacher, digits.train, batch_size=64, device="cpu")
    assert targets.shape == (len(digits.train), 10)
    x, (y, index) = next(iter(DataLoader(IndexedDataset(digits.train), batch_size=16, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))))
    student.eval()  # the same forward twice
    runs = []
    for step, labels in ((distill_step(0.7, 3.0, targets=targets), (y, index)), (distill_step(0.7, 3.0, teacher=teacher), y)):
        student.zero_grad()
        runs.append((step(student, x, labels), grads_of(student)))
    assert torch.allclose(runs[0][0], runs[1][0], atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(runs[0][1], runs[1][1]))
    with torch.no_grad():  # the formula: (1 - w) CE + w T^2 KL(teacher_T || student_T)
        logits, soft = student(x), (teacher(x) / 3.0).softmax(dim=1)
        kd = F.kl_div((logits / 3.0).log_softmax(dim=1), soft, reduction="batchmean")
        expected = 0.3 * F.cross_entropy(logits, y) + 0.7 * 9.0 * kd
    assert runs[0][0] == pytest.approx(float(expected), rel=1e-5)
    with pytest.raises(ValueError, match="exactly one of targets"):
        distill_step(0.5, 1.0)


def test_distill_uses_the_pretrained_networks_logits_and_counts_their_pass(digits, tmp_path):
    plain = ne.PruneAndGrow(**FAST)
    plain_em = plain.fit(fresh_model(), digits.train, digits.val).elastic_model
    pg = ne.PruneAndGrow(distill=0.8, distill_temperature=2.0, checkpoint_dir=tmp_path, **FAST)
    em = pg.fit(fresh_model(), digits.train, digits.val).elastic_model
    # the teacher is the network after pretraining (pretrain.pt), run once over the training set
    pretrained = fresh_model(5)
    pretrained.load_state_dict(read_checkpoint(tmp_path / "pretrain.pt")["state_dict"])
    stored = read_checkpoint(tmp_path / "teacher.pt")["targets"]
    assert torch.allclose(stored, predictions(pretrained, digits.train, device="cpu"), atol=1e-5)
    assert pg.compute_["full_epochs"] == pytest.approx(plain.compute_["full_epochs"] + FORWARD_COST)
    # the levels learned from it: every pruned and grown weight differs from the run without it
    assert not torch.equal(em.state_dict()["model.conv1.weight"], plain_em.state_dict()["model.conv1.weight"])
    config = pg.config()
    assert (config["distill"], config["distill_temperature"]) == (0.8, 2.0)
    assert (plain.config()["distill"], plain.config()["distill_temperature"]) == (None, None)  # old checkpoints match


def test_resume_with_distill_reproduces_the_uninterrupted_run(digits, tmp_path):
    kw = dict(distill=0.5, **FAST)
    reference = ne.PruneAndGrow(checkpoint_dir=tmp_path / "a", **kw).fit(fresh_model(), digits.train, digits.val).elastic_model

    def stop_after_prune(info):
        if info.name.startswith("prune_1"):
            raise Interrupt

    with pytest.raises(Interrupt):
        ne.PruneAndGrow(checkpoint_dir=tmp_path / "b", on_step_end=stop_after_prune, **kw).fit(
            fresh_model(), digits.train, digits.val)
    resumed = ne.PruneAndGrow(checkpoint_dir=tmp_path / "b", **kw).fit(
        fresh_model(seed=123), digits.train, digits.val, resume=True).elastic_model
    ref_state, res_state = reference.state_dict(), resumed.state_dict()
    for key in ref_state:
        assert torch.allclose(ref_state[key].float(), res_state[key].float(), atol=1e-6), key
    # the teacher cannot be rebuilt once pruning has started: a clear error naming the file
    (tmp_path / "b" / "teacher.pt").unlink()
    with pytest.raises(CheckpointError, match="teacher.pt"):
        ne.PruneAndGrow(checkpoint_dir=tmp_path / "b", **kw).fit(fresh_model(), digits.train, digits.val, resume=True)
    with pytest.raises(ValueError, match="distill: 0.5 -> 0.9"):
        ne.PruneAndGrow(checkpoint_dir=tmp_path / "b", **dict(kw, distill=0.9)).fit(
            fresh_model(), digits.train, digits.val, resume=True)


def test_distill_from_a_dataloader_runs_the_teacher_per_batch_and_says_so(digits, caplog):
    loader = DataLoader(digits.train, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
    plain = ne.PruneAndGrow(**FAST)
    plain.fit(fresh_model(), loader, digits.val)
    pg = ne.PruneAndGrow(distill=0.5, **FAST)
    with caplog.at_level(logging.WARNING, logger="nni_elastic.strategies.prune_and_grow"):
        pg.fit(fresh_model(), loader, digits.val)
    assert "DataLoader" in caplog.text and "every distilled batch" in caplog.text
    distilled_epochs = FAST["finetune_epochs"] + FAST["grow_epochs"]  # one prune step, one grow step
    assert pg.compute_["full_epochs"] == pytest.approx(plain.compute_["full_epochs"] + distilled_epochs * FORWARD_COST)


def test_distill_recipe_keys_and_their_errors():
    recipe = load_recipe("strategies/prune_and_grow/digits.yaml", overrides={"strategy.distill": 0.5})
    assert recipe.strategy.distill == 0.5 and recipe.strategy.distill_temperature == 4.0
    for key, bad in (("strategy.distill", 1.5), ("strategy.distill_temperature", 0)):
        with pytest.raises(RecipeError, match=key.split(".")[1]):
            load_recipe("strategies/prune_and_grow/digits.yaml", overrides={key: bad})
