"""Device selection: ``auto`` uses CUDA when present, else the CPU."""
from __future__ import annotations

import os

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
