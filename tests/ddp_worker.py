"""One process of the multi-process training test (started by torchrun from tests/test_distributed.py).

Trains a small elastic CNN on a shard of a fixed data set with ``train`` (DistributedDataParallel
inside), widens a layer mid-run the way growth does, and writes what the test compares:
weights, BatchNorm statistics, the loss history, sharded and whole-set evaluations; or (``nested``)
runs expansion growth with nested history levels and writes the model's and the levels' tensors.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

from nni_elastic import ElasticModel
from nni_elastic import distributed as dist
from nni_elastic.training import TrainConfig, elastic_step, evaluate, train


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


def data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 6, 6, generator=g)
    return TensorDataset(x, (x.mean(dim=(1, 2, 3)) * 4).long().clamp(-2, 1) + 2)


def main(out: Path, mode: str) -> None:
    dist.setup_from_env("cpu")
    torch.manual_seed(1234 + dist.rank())  # different on purpose: the DDP wrap must make the weights equal
    cfg = TrainConfig(epochs=2, lr=0.05, batch_size=16, seed=3)
    if mode == "nested":  # growth whose history levels (own BatchNorm weights and statistics) train on every rank
        import nni_elastic as ne

        model = ne.create_model("growable_cnn", num_classes=4, in_channels=1, channels=[4, 8], blocks=[0, 0])
        eg = ne.ExpansionGrowth(threshold=0.0, check_every=2, warmup_steps=2, max_expansions=2, grow_until=0.5, epochs=2,
                                score_batch=16, lr=0.05, batch_size=16, seed=3, device="cpu", quiet=True,
                                history="nested", history_bn="private")
        history = eg.fit(model, data(96, 0), data(40, 1)).details.history
        levels = {f"level{i}.{k}": v for i, lv in enumerate(eg.state_.levels) for k, v in lv.state().items()}
        torch.save({"state": {**{k: v.detach().clone() for k, v in model.state_dict().items()}, **levels},
                    "levels": len(eg.state_.levels), "history": history}, out / f"rank{dist.rank()}.pt")
        dist.barrier()  # neither process closes its connections while the other still reads
        dist.teardown()
        return
    if mode == "elastic":
        em = ElasticModel(SmallNet(), torch.randn(1, 1, 6, 6), widths=(0.5, 1.0))
        history = train(em, data(96, 0), data(40, 1), cfg, step=elastic_step, device="cpu", quiet=True)
        model = em
    else:  # growth: a new, wider head mid-run (new Parameter objects), as an expansion does
        model = SmallNet()
        grown = {}

        def after_step(opt: torch.optim.Optimizer, step: int) -> None:
            if step == 3 and not grown:
                old = model.head
                model.head = nn.Linear(8, 4)  # rank 0's new weights reach every rank with the next wrap
                grown["done"] = True
                opt.param_groups[0]["params"] = [p for p in opt.param_groups[0]["params"] if p is not old.weight and p is not old.bias] + list(model.head.parameters())

        if mode == "diverge":  # a decision taken on one rank only, without a new wrap: the check must catch it
            def after_step(opt: torch.optim.Optimizer, step: int) -> None:
                if step == 2 and dist.rank() == 1:
                    with torch.no_grad():
                        model.conv.weight[0, 0, 0, 0] += 1.0

        history = train(model, data(96, 0), data(40, 1), cfg, device="cpu", quiet=True, after_step=after_step)
    sharded = evaluate(model, data(40, 1), device="cpu")
    torch.save({"state": {k: v.detach().clone() for k, v in model.state_dict().items()},
                "history": history.epochs, "evaluate": sharded, "world": dist.world_size()},
               out / f"rank{dist.rank()}.pt")
    dist.barrier()  # neither process closes its connections while the other still reads
    dist.teardown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
