"""Reader for the IDX format of (Fashion-)MNIST, gzip-compressed or not."""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

_UBYTE = 0x08


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read an unsigned-byte IDX file (magic 0x0000 08 `ndim`) into a uint8 array.

    Args:
        path: `.gz` or raw IDX file (gzip is detected from its first bytes, not its name).
        ndim: expected number of dimensions: 3 for images, 1 for labels.

    Example:
        >>> read_idx(Path("train-labels-idx1-ubyte.gz"), ndim=1).shape
        (60000,)
    """
    raw = _read_bytes(path)
    expected = bytes([0, 0, _UBYTE, ndim])
    if raw[:4] != expected:
        raise ValueError(
            f"{path} is not an IDX file of unsigned bytes with {ndim} dimension(s): magic number "
            f"0x{raw[:4].hex()}, expected 0x{expected.hex()}; the file is corrupted or of another kind, "
            "replace it (e.g. reinstall dataset-fashion-mnist)"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path} is truncated: {len(raw)} bytes, shorter than its {header}-byte IDX header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    size = int(np.prod(dims))
    if len(raw) - header != size:
        raise ValueError(
            f"{path} is truncated or padded: header says {dims} = {size} bytes of data, "
            f"found {len(raw) - header}; replace the file"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def _read_bytes(path: Path) -> bytes:
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError) as err:
        raise ValueError(f"{path} is not a valid gzip file ({err}); the file is corrupted, replace it") from None
