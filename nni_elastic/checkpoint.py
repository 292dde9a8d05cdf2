"""Atomic checkpoint writing: a crash never leaves a half-written file behind."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Union

import torch

PathLike = Union[str, os.PathLike]

__all__ = ["atomic_write", "atomic_save", "atomic_write_text", "atomic_write_json"]


def atomic_write(path: PathLike, write: Callable[[BinaryIO], Any]) -> Path:
    """Call ``write(file)`` on a temporary file in the same directory, fsync, then ``os.replace`` it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_save(obj: Any, path: PathLike) -> Path:
    """``torch.save`` to a temporary file in the same directory, then ``os.replace`` it into place."""
    return atomic_write(path, lambda fh: torch.save(obj, fh))


def atomic_write_text(text: str, path: PathLike) -> Path:
    return atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


def atomic_write_json(obj: Any, path: PathLike) -> Path:
    return atomic_write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", path)
