"""Device selection: ``auto`` uses CUDA when present, else the CPU."""
from __future__ import annotations

import os
from typing import Any

import torch

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Map ``auto|cpu|cuda`` (or ``cuda:N``) to a ``torch.device``; error if CUDA is asked but absent."""
    if isinstance(device, torch.device):
        return device
    name = str(device)
    if name in ("auto", "cuda") and torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))  # torchrun: one GPU per process
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available; use --device auto or cpu")
        return torch.device(name)
    raise ValueError(f"unknown device {name!r}; use one of {', '.join(DEVICES)} (or cuda:N)")


def module_device(module: torch.nn.Module) -> torch.device | None:
    """Where ``module``'s first parameter (or buffer) lives; None for a module with neither."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return None


def run_device(module: torch.nn.Module, device: str | torch.device = "auto") -> torch.device:
    """The device to run ``module`` on: ``auto`` is where the module already is (a model loaded
    on the CPU is evaluated there, one trained on CUDA stays there); anything else is resolved as
    :func:`resolve_device` does, and the caller moves the module."""
    if str(device) == "auto":
        here = module_device(module)
        if here is not None and here.type != "meta":
            return here
    return resolve_device(device)


def to_device(obj: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """Tensors in ``obj`` (a tensor, or tuples, lists and dicts of them) on ``device``; anything else as it is."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=non_blocking)
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(x, device, non_blocking) for x in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device, non_blocking) for k, v in obj.items()}
    return obj
