"""Checkpoint files: atomic writers, and the formats nni-elastic writes and reads.

Writing: a crash never leaves a half-written file behind (temporary file in the same directory,
fsync, ``os.replace``); files get the user's umask like any other file; temporary files of a write
that was killed are removed by the next write of the same file.

Reading: every file loads with ``torch.load(weights_only=True)``, which admits tensors and plain
containers only, so no code runs from a file. Checkpoints therefore hold no pickled modules: a zoo
model is stored as its registry name and keywords (``nni_elastic_arch``) plus its state dict, and
rebuilt with :func:`rebuild_model`, which also gives every Conv/Linear/BatchNorm the stored shapes
(width-grown or pruned models). A model the package cannot rebuild is passed in by the user
(``model=...``); only ``trust=True`` (CLI ``--trust-checkpoint``) unpickles a stored module.

Formats (each a dict with a ``format`` tag):

* ``nni-elastic/elastic-model``: :func:`save_elastic` / :func:`load_elastic` (``ElasticModel``).
* ``nni-elastic/growth-checkpoint`` (``-state`` for resume): :func:`growth_payload` / :func:`read_growth`.
* ``nni-elastic/compact-model``: a compact export as state dict + architecture,
  :func:`save_compact` / :func:`load_compact`.
"""
from __future__ import annotations

import copy
import io
import json
import os
import pickletools
import re
import sys
import tempfile
import threading
import time
import warnings
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, BinaryIO, Callable, Mapping, Optional, Union

import torch
import torch.nn as nn

from .distributed import is_main

PathLike = Union[str, os.PathLike]

__all__ = [
    "CheckpointError",
    "TRUST_HINT",
    "atomic_write",
    "atomic_save",
    "atomic_write_text",
    "atomic_write_json",
    "remove_stale_temps",
    "ensure_output_dir",
    "read_checkpoint",
    "rebuild_model",
    "fit_shapes",
    "save_elastic",
    "load_elastic",
    "check_level_rows",
    "growth_payload",
    "read_growth",
    "save_compact",
    "load_compact",
]

ELASTIC_FORMAT = "nni-elastic/elastic-model"
ELASTIC_VERSION = 1
GROWTH_FORMAT = "nni-elastic/growth-checkpoint"
COMPACT_FORMAT = "nni-elastic/compact-model"
TRUST_HINT = ("trust=True (CLI: --trust-checkpoint) unpickles it, which runs code from the file: "
              "use it only for files you wrote yourself")
_STALE_AFTER_S = 3600.0  # temporary files of unknown owner older than this are leftovers
_umask_lock = threading.Lock()


class CheckpointError(ValueError):
    """A file cannot be loaded safely or is not what it should be; the message names the file and the fix."""


# ---------------------------------------------------------------------- atomic writes
def _umask() -> int:
    with _umask_lock:  # os.umask can only be read by setting it
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_TMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[^.]+\.tmp$")


def remove_stale_temps(directory: PathLike, name: Optional[str] = None) -> list[Path]:
    """Remove temporary files of atomic writes whose process is gone (all of them, or those of ``name``)."""
    directory = Path(directory)
    removed = []
    if not directory.is_dir():
        return removed
    for entry in directory.glob(f".{name}.*.tmp" if name else ".*.tmp"):
        match = _TMP.match(entry.name)
        try:
            if match:  # our own naming: the writer's pid tells whether it still runs
                stale = int(match["pid"]) != os.getpid() and not _pid_alive(int(match["pid"]))
            else:  # an older naming without pid: only when clearly abandoned
                stale = time.time() - entry.stat().st_mtime > _STALE_AFTER_S
            if stale:
                entry.unlink()
                removed.append(entry)
        except OSError:  # another process removed it first, or it is not ours to remove
            continue
    return removed


def atomic_write(path: PathLike, write: Callable[[BinaryIO], Any]) -> Path:
    """Call ``write(file)`` on a temporary file in the same directory, fsync, then ``os.replace`` it into place.

    In a multi-process run only rank 0 writes (the others return the path at once): every process
    holds the same weights, and one writer keeps files whole.
    """
    path = Path(path)
    if not is_main():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent, path.name)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a checkpoint is an ordinary file
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


def ensure_output_dir(path: PathLike, option: str = "--out") -> Path:
    """Create ``path`` as a writable directory, or raise one line naming it and the fix."""
    path = Path(path)
    for parent in [path, *path.parents]:
        if parent.exists():
            if not parent.is_dir():
                where = "is a file" if parent == path else f"is under the file {str(parent)!r}"
                raise CheckpointError(f"{option} {str(path)!r} {where}; choose a directory")
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=path)  # os.access lies for root and ACLs
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise CheckpointError(f"{option} {str(path)!r} is not writable ({exc.strerror}); choose another directory") from None
    return path


# ---------------------------------------------------------------------- safe reading
def read_checkpoint(path: PathLike, *, what: str = "checkpoint", trust: bool = False, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with one-line errors; ``trust=True`` unpickles anything (runs code)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    try:
        with warnings.catch_warnings():  # torch's notes on odd pickles: a failure gets our one line instead
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=not trust)
    except Exception as exc:  # torch raises many types on garbage: one message for all of them
        match = re.search(r"GLOBAL ([\w.]+)", str(exc))
        refused = match.group(1) if match else (_pickled_global(path) if "Weights only load failed" in str(exc) else None)
        if not trust and refused:
            found = f" ({refused})" if refused != "?" else ""
            raise CheckpointError(
                f"{path}: refused to load: it holds pickled Python objects{found} that could run code, and "
                f"nni-elastic files hold only tensors and plain data; {TRUST_HINT}"
            ) from None
        raise CheckpointError(
            f"{path}: not a readable nni-elastic {what} (truncated or not a checkpoint?); write it again or pass "
            f"the right file"
        ) from None


def _pickled_global(path: Path) -> Optional[str]:
    """For a bare pickle (not a torch zip): the first global it would import, ``"?"`` if unnamed, None if
    it is no pickle at all. ``pickletools`` only parses; nothing is imported or run."""
    if zipfile.is_zipfile(path):
        return None
    strings: list[str] = []
    try:
        for op, arg, _ in pickletools.genops(path.read_bytes()):
            if op.name == "GLOBAL":
                return str(arg).replace(" ", ".")
            if op.name == "STACK_GLOBAL":
                return ".".join(strings[-2:]) or "?"
            if op.name in ("INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX", "BUILD"):
                return "?"
            if isinstance(arg, str):
                strings.append(arg)
    except Exception:  # not a pickle: garbage, text, truncated
        return None
    return None


def _check_format(payload: Any, path: PathLike, fmt: str, what: str) -> dict:
    if not isinstance(payload, dict) or payload.get("format") != fmt:
        raise CheckpointError(f"{path} is not an nni-elastic {what} (no {fmt!r} format tag)")
    return payload


def _unpickle_module(payload: Mapping[str, Any], path: PathLike, trust: bool, map_location: Any) -> nn.Module:
    """The pickled module of a file (``trust=True`` only)."""
    name = payload.get("module_class") or "a custom class"
    if not trust:
        raise CheckpointError(
            f"{path}: the model ({name}) is stored pickled; pass model=<a new {name}> to load it safely, or "
            f"{TRUST_HINT}"
        )
    module = payload["module"]
    if isinstance(module, bytes):
        module = torch.load(io.BytesIO(module), map_location=map_location, weights_only=False)
    if not isinstance(module, nn.Module):
        raise CheckpointError(f"{path}: the stored model is a {type(module).__name__}, not a torch module")
    return module


def _module_bytes(model: nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    return buffer.getvalue()


# ---------------------------------------------------------------------- rebuilding models
def _state_tensor(state: Mapping[str, Any], prefix: str, *names: str) -> Optional[torch.Tensor]:
    for name in names:
        t = state.get(prefix + name)
        if isinstance(t, torch.Tensor):
            return t
    return None


def _empty(shape: Any, like: torch.Tensor, requires_grad: bool = True) -> nn.Parameter:
    return nn.Parameter(torch.empty(tuple(shape), dtype=like.dtype, device=like.device), requires_grad=requires_grad)


@torch.no_grad()
def _fit_module(module: nn.Module, name: str, prefix: str, state: Mapping[str, Any], source: PathLike) -> None:
    """Resize one module's tensors (and channel attributes) to the shapes in ``state``; values come later."""
    w = _state_tensor(state, prefix, "weight")
    if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed and w is not None:
        if tuple(w.shape) == tuple(module.weight.shape):
            return
        out = int(w.shape[0])
        if module.groups > 1 and module.groups == module.in_channels == module.out_channels:  # depthwise
            module.groups = module.in_channels = out
        else:
            module.in_channels = int(w.shape[1]) * module.groups
        module.out_channels = out
        module.weight = _empty(w.shape, module.weight, module.weight.requires_grad)
        if module.bias is not None:
            module.bias = _empty((out,), module.bias, module.bias.requires_grad)
    elif isinstance(module, nn.Linear) and w is not None:
        if tuple(w.shape) == tuple(module.weight.shape):
            return
        module.out_features, module.in_features = int(w.shape[0]), int(w.shape[1])
        module.weight = _empty(w.shape, module.weight, module.weight.requires_grad)
        if module.bias is not None:
            module.bias = _empty((w.shape[0],), module.bias, module.bias.requires_grad)
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        ref = _state_tensor(state, prefix, "weight", "running_mean", "level_running_mean")
        if ref is None or ref.shape[-1] == module.num_features:
            return
        n = int(ref.shape[-1])
        module.num_features = n
        if module.weight is not None:
            module.weight = _empty((n,), module.weight, module.weight.requires_grad)
            module.bias = _empty((n,), module.bias, module.bias.requires_grad)
        if module.running_mean is not None:
            module.running_mean = torch.zeros(n, dtype=module.running_mean.dtype, device=module.running_mean.device)
            module.running_var = torch.ones(n, dtype=module.running_var.dtype, device=module.running_var.device)
    else:
        own = dict(module.named_parameters(recurse=False))
        own.update((n, b) for n, b in module.named_buffers(recurse=False) if b is not None)
        for key, tensor in own.items():
            stored = state.get(prefix + key)
            if isinstance(stored, torch.Tensor) and stored.shape != tensor.shape:
                raise CheckpointError(
                    f"{source}: cannot rebuild {name or 'the model'} ({type(module).__name__}): {key} is stored with "
                    f"shape {tuple(stored.shape)}, the rebuilt module has {tuple(tensor.shape)}; pass model=<an "
                    f"instance of the saved architecture>"
                )


def fit_shapes(model: nn.Module, state: Mapping[str, Any], source: PathLike = "state dict") -> nn.Module:
    """Give every Conv/Linear/BatchNorm of ``model`` the channel counts stored in ``state`` (in place).

    A width-grown or physically pruned model differs from its registry architecture only in channel
    counts, so its registry name and keywords plus the state dict rebuild it.
    """
    for name, module in model.named_modules():
        _fit_module(module, name, f"{name}." if name else "", state, source)
    return model


def rebuild_model(arch: Mapping[str, Any], state: Mapping[str, Any], source: PathLike) -> nn.Module:
    """A zoo model from its ``nni_elastic_arch`` (registry name + keywords), shaped like ``state``."""
    from .models import create_model

    if not isinstance(arch, Mapping) or "name" not in arch:
        raise CheckpointError(f"{source}: its architecture record {arch!r} is not a model name and keywords")
    try:
        model = create_model(arch["name"], **dict(arch.get("kwargs", {})))
    except ValueError as exc:
        raise CheckpointError(f"{source}: cannot rebuild the model: {exc}") from None
    return fit_shapes(model, state, source)


def _load_weights(module: nn.Module, state: Mapping[str, Any], source: PathLike) -> None:
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:300]
        raise CheckpointError(f"{source}: its weights do not fit the model ({detail}); pass model=<an instance of "
                              f"the architecture it was saved from>") from None


def _arch_of(model: nn.Module) -> Optional[dict]:
    return copy.deepcopy(getattr(model, "nni_elastic_arch", None))


def _model_for(payload: Mapping[str, Any], state: Mapping[str, Any], path: PathLike, model: Optional[nn.Module],
               trust: bool, map_location: Any) -> nn.Module:
    """The module a payload's weights go into: the user's, the rebuilt zoo model, or (trust) the pickled one."""
    if model is not None:
        return fit_shapes(model, state, path)
    if payload.get("arch") is not None:
        return rebuild_model(payload["arch"], state, path)
    if "module" in payload:
        return _unpickle_module(payload, path, trust, map_location)
    raise CheckpointError(f"{path}: the model is not from the nni-elastic zoo and was not stored; pass "
                          f"model=<a new instance of its architecture>")


# ---------------------------------------------------------------------- elastic models
def save_elastic(em: Any, path: PathLike, metadata: Mapping[str, Any], *, pickle_model: bool = False) -> Path:
    """Write an ``ElasticModel``: architecture (zoo name + keywords), constructor settings, levels, weights.

    ``pickle_model=True`` also stores a model outside the zoo pickled (as bytes, so the file itself
    still loads with ``weights_only=True``); reading it back needs ``trust=True``.
    """
    arch = _arch_of(em.model)
    config = em.init_config()
    payload: dict[str, Any] = {
        "format": ELASTIC_FORMAT,
        "version": ELASTIC_VERSION,
        "arch": arch,
        "example_shape": list(em.example_shape),
        "config": config,
        # read by nni-elastic versions before ``config``
        "bn": config.get("bn"),
        "round_to": config.get("round_to", 1),
        "ignored_layers": config.get("ignored_layers", []),
        "levels": [asdict(lv) for lv in em.levels_],
        "state_dict": {k: v.detach().cpu() for k, v in em.model.state_dict().items()},
        "metadata": dict(metadata),
    }
    if arch is None and pickle_model:
        plain = em.plain_copy(0).cpu()
        payload["module"] = _module_bytes(plain)
        payload["module_class"] = f"{type(plain).__module__}.{type(plain).__qualname__}"
    return atomic_save(payload, path)


def load_elastic(cls: type, path: PathLike, *, model: Optional[nn.Module] = None, trust: bool = False,
                 map_location: Any = "cpu") -> Any:
    """Read a file written by :func:`save_elastic` into a new ``cls`` (an ``ElasticModel``)."""
    payload = read_checkpoint(path, what="checkpoint", trust=trust, map_location=map_location)
    payload = _check_format(payload, path, ELASTIC_FORMAT, "elastic checkpoint")
    if payload.get("version", 0) > ELASTIC_VERSION:
        raise CheckpointError(f"{path} has format version {payload['version']}; this nni-elastic reads up to "
                              f"{ELASTIC_VERSION}: upgrade nni-elastic")
    state = payload["state_dict"]
    model = _model_for(payload, state, path, model, trust, map_location)
    if map_location is not None and not callable(map_location):
        model = model.to(map_location)
    saved = payload["levels"]
    config = payload.get("config")
    if config is None:  # written before ``config``: the keywords were stored one by one
        config = {"levels": [saved_channels(lv["channels"]) for lv in saved], "bn": payload["bn"],
                  "round_to": payload.get("round_to", 1), "ignored_layers": payload["ignored_layers"]}
    em = cls(model, torch.zeros(payload["example_shape"]), reorder=False, **config)
    _load_weights(em.model, state, path)
    for level, lv in zip(em.levels_, saved):
        level.width, level.macs, level.params = lv["width"], lv["macs"], lv["params"]
        level.latency = {str(k): float(v) for k, v in (lv.get("latency") or {}).items()}
    em.metadata = payload.get("metadata", {})
    return em


def saved_channels(channels: Mapping[str, int]) -> dict[str, Union[int, float]]:
    """Channel counts as a ``levels`` entry: a count of 1 would read as width 1 (full), so it becomes
    the smallest positive fraction, which keeps exactly one channel."""
    return {g: (sys.float_info.min if k == 1 else k) for g, k in channels.items()}


def check_level_rows(em: Any, state: Mapping[str, Any]) -> None:
    """Before ``ElasticModel.load_state_dict``: one line when ``state`` was saved with another number of levels."""
    if isinstance(state, Mapping) and state.get("format") == ELASTIC_FORMAT:
        raise CheckpointError("load_state_dict got a whole elastic checkpoint; use ElasticModel.load(path), or pass "
                              "its ['state_dict'] to em.model.load_state_dict")
    own = em.state_dict()
    for key, value in state.items():
        mine = own.get(key)
        if (".level_" in key and isinstance(value, torch.Tensor) and isinstance(mine, torch.Tensor)
                and value.dim() == mine.dim() and value.shape[0] != mine.shape[0]):
            extra = mine.shape[0] - em.num_levels  # statistic rows beyond one per level (the ad-hoc slot)
            theirs = value.shape[0] - extra
            raise CheckpointError(
                f"load_state_dict: the state dict holds {theirs} levels ({key} has {value.shape[0]} rows), this "
                f"ElasticModel has {em.num_levels}; load the checkpoint with ElasticModel.load(path), which "
                f"rebuilds its levels"
            )


# ---------------------------------------------------------------------- growth checkpoints
def growth_payload(model: nn.Module, metadata: Mapping[str, Any], *, state: bool = False, **extra: Any) -> dict:
    """A growth checkpoint (``state=True``: the resume state of a run): architecture + weights, no code."""
    return {
        "format": GROWTH_FORMAT + ("-state" if state else ""),
        "version": 2,
        "arch": _arch_of(model),
        "model_class": type(model).__name__,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "metadata": dict(metadata),
        **extra,
    }


def read_growth(path: PathLike, *, model: Optional[nn.Module] = None, state: bool = False,
                trust: bool = False) -> tuple[nn.Module, dict]:
    """``(model, payload)`` of a growth checkpoint; ``model``: a new instance of the model growth started from."""
    what = "growth state" if state else "growth checkpoint"
    payload = read_checkpoint(path, what=what, trust=trust)
    payload = _check_format(payload, path, GROWTH_FORMAT + ("-state" if state else ""), what)
    if "state_dict" not in payload:  # written before version 2: a pickled module only
        return _unpickle_module(payload, path, trust, "cpu"), payload
    state_dict = payload["state_dict"]
    module = _model_for(payload, state_dict, path, model, trust, "cpu")
    _load_weights(module, state_dict, path)
    return module, payload


# ---------------------------------------------------------------------- compact exports
def save_compact(module: nn.Module, path: PathLike) -> Path:
    """A compact (exported) model as state dict + architecture: loads without running code."""
    return atomic_save({
        "format": COMPACT_FORMAT,
        "version": 1,
        "arch": _arch_of(module),
        "model_class": type(module).__name__,
        "channels": dict(getattr(module, "nni_elastic_channels", {}) or {}),
        "state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()},
    }, path)


def load_compact(path: PathLike, *, model: Optional[nn.Module] = None) -> nn.Module:
    """Load a compact export written by :func:`save_compact` (``level{i}.state.pt``), in eval mode.

    Args:
        path: the file.
        model: for models outside the zoo, a new instance of the full architecture (resized to the
            stored channel counts).

    Example:
        >>> compact = load_compact("runs/prune_and_grow/digits/exports/level0.state.pt")
    """
    payload = _check_format(read_checkpoint(path, what="compact export"), path, COMPACT_FORMAT, "compact export")
    state = payload["state_dict"]
    module = _model_for(payload, state, path, model, False, "cpu")
    _load_weights(module, state, path)
    module.nni_elastic_channels = dict(payload.get("channels", {}))
    return module.eval()
