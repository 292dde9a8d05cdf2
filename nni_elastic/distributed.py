"""One training on several processes: ``torchrun`` + ``torch.distributed`` + DistributedDataParallel.

Start a run with ``torchrun --nproc_per_node N -m nni_elastic.cli run RECIPE`` (or
``nni-elastic run RECIPE --nproc N``, which starts torchrun for you). Every process runs the whole
strategy; :func:`nni_elastic.training.train` then

- takes a shard of the training set per process (``DistributedSampler``, reshuffled per epoch);
  ``train.batch_size`` stays the *global* batch, each of N processes takes ``batch_size / N``, so
  the learning rate and the number of optimizer steps are those of a one-process run;
- averages gradients with :class:`torch.nn.parallel.DistributedDataParallel` (gloo on CPU, NCCL on
  GPUs), re-wrapping the model when growth changed its parameters (the new wrapper broadcasts
  rank 0's weights, so a grown tensor is the same everywhere);
- averages BatchNorm statistics over the processes (every level's rows) at the end of each epoch
  and before any evaluation, and evaluates on shards whose counts are summed.

Decisions (a growth check, a reorder) are taken from rank 0 (:func:`from_main`); only rank 0 writes
files (:func:`nni_elastic.checkpoint.atomic_write` is a no-op elsewhere). One process, or no
process group, makes every function here a no-op.

Setting ``NNI_ELASTIC_CHECK_SYNC=1`` makes ``train`` compare a checksum of every parameter across
the processes after each optimizer step and fail at the first divergence (tests, debugging).
"""
from __future__ import annotations

import inspect
import logging
import os
from typing import Any, Iterable, Optional

import torch
import torch.nn as nn

__all__ = [
    "is_distributed", "rank", "world_size", "is_main", "setup_from_env", "teardown", "barrier", "from_main",
    "all_reduce_", "mean_", "sync_buffers", "check_in_sync", "shard_indices", "Replicated", "SyncError",
]

logger = logging.getLogger(__name__)

CHECK_SYNC_ENV = "NNI_ELASTIC_CHECK_SYNC"


class SyncError(RuntimeError):
    """The processes of one run hold different weights (a decision was not shared)."""


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1


def rank() -> int:
    return torch.distributed.get_rank() if is_distributed() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0, or the only process."""
    return rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def setup_from_env(device: str = "auto") -> bool:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1 in the environment).

    The backend is NCCL when the run uses CUDA, else gloo. Returns True when this call initialised
    the group (the caller then calls :func:`teardown`).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not torch.distributed.is_available():
        return False
    if torch.distributed.is_initialized():
        return False
    cuda = torch.cuda.is_available() and str(device) != "cpu"
    if cuda:
        torch.cuda.set_device(local_rank())
    torch.distributed.init_process_group(backend="nccl" if cuda else "gloo")
    if rank() != 0:  # one log of the run: rank 0's (warnings and errors from every rank)
        logging.getLogger("nni_elastic").setLevel(max(logging.WARNING, logging.getLogger("nni_elastic").getEffectiveLevel()))
    logger.info("process %d of %d (%s)", rank(), world_size(), "nccl" if cuda else "gloo")
    return True


def teardown() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        torch.distributed.barrier()


def from_main(obj: Any) -> Any:
    """Rank 0's ``obj`` on every process (any picklable value); ``obj`` itself in one process."""
    if not is_distributed():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Sum (or mean) ``tensor`` over the processes in place; returns it."""
    if not is_distributed():
        return tensor
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    if op == "mean":
        tensor.div_(world_size())
    return tensor


@torch.no_grad()
def sync_buffers(model: nn.Module) -> None:
    """Average every floating-point buffer (BatchNorm running statistics, each level's rows) over the processes.

    Each process updated the statistics on its own shard; their mean is the statistics of the
    whole batch stream (up to the spread of the shard means, which a running variance ignores
    in one process too). Integer buffers (batch counters) advance identically everywhere.
    """
    mean_(b for b in model.buffers() if b.is_floating_point())


@torch.no_grad()
def mean_(tensors: Iterable[torch.Tensor]) -> None:
    """Replace each tensor by its mean over the processes, in one collective (float64 on the way)."""
    if not is_distributed():
        return
    tensors = list(tensors)
    if not tensors:
        return
    flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])
    all_reduce_(flat, "mean")
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t).to(t.dtype))
        offset += n


@torch.no_grad()
def _checksum(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    sums = []
    for t in tensors:
        flat = t.detach().reshape(-1).to(torch.float64)
        weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device)
        sums.append(torch.stack([flat.sum(), (flat * weights).sum() / flat.numel(), flat.new_tensor(flat.numel())]))
    return torch.stack(sums) if sums else torch.zeros(0, 3, dtype=torch.float64)


def check_in_sync(model: nn.Module, what: str = "") -> None:
    """Raise :class:`SyncError` unless every process holds the same parameters (names, shapes, values)."""
    if not is_distributed():
        return
    names = [n for n, _ in model.named_parameters()]
    mine = (names, [tuple(p.shape) for p in model.parameters()])
    shapes = [None] * world_size()
    torch.distributed.all_gather_object(shapes, mine)
    if any(s != shapes[0] for s in shapes):
        raise SyncError(f"processes hold different parameter sets {what}: rank 0 has {len(shapes[0][0])} tensors, "
                        f"ranks {[i for i, s in enumerate(shapes) if s != shapes[0]]} differ")
    local = _checksum(model.parameters())
    gathered = [torch.empty_like(local) for _ in range(world_size())]
    torch.distributed.all_gather(gathered, local)
    for r, other in enumerate(gathered[1:], start=1):
        if not torch.equal(other, gathered[0]):
            bad = (other != gathered[0]).any(dim=1).nonzero().flatten().tolist()
            raise SyncError(f"rank {r} diverged from rank 0 {what} in {', '.join(names[i] for i in bad[:5])}")


def check_sync_requested() -> bool:
    return os.environ.get(CHECK_SYNC_ENV, "") not in ("", "0")


def shard_indices(n: int) -> range:
    """This process's share of ``n`` items for evaluation: every N-th, no padding, no overlap."""
    return range(rank(), n, world_size())


# torch >= 2.13 names it forward_sync_buffers (broadcast_buffers is deprecated); older releases only the latter
_NO_FORWARD_BUFFER_SYNC = ({"forward_sync_buffers": False}
                           if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel).parameters
                           else {"broadcast_buffers": False})


def _signature(model: nn.Module) -> tuple:
    return tuple((id(p), tuple(p.shape), p.requires_grad) for p in model.parameters())


class Replicated:
    """The model a step function sees in a multi-process run.

    Calling it runs the forward through DistributedDataParallel (so the backward averages the
    gradients over the processes); every attribute (``use_level``, ``num_levels``, ...) is the
    model's own. :meth:`refresh` re-wraps the model after growth changed its parameters.
    """

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.module = model
        self._device = device
        self._ddp: Optional[nn.parallel.DistributedDataParallel] = None
        self._sig: tuple = ()
        self.refresh()

    def refresh(self) -> bool:
        """Wrap again when the parameter set changed; returns True when it did (weights broadcast from rank 0)."""
        sig = _signature(self.module)
        if self._ddp is not None and sig == self._sig:
            return False
        self._ddp = None  # the old wrapper's gradient hooks go with it
        ids = [self._device.index] if self._device.type == "cuda" else None
        # buffers are averaged per epoch (sync_buffers), not overwritten by rank 0's on every forward
        self._ddp = nn.parallel.DistributedDataParallel(self.module, device_ids=ids, **_NO_FORWARD_BUFFER_SYNC)
        self._sig = sig
        return True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._ddp(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["module"], name)
