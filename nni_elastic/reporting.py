"""Outputs people look at: level tables, compact exports of every level, accuracy-vs-MACs plots, error lines."""
from __future__ import annotations

import io
import statistics
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch

from .checkpoint import atomic_save, atomic_write, save_compact

__all__ = ["print_table", "save_module", "save_exports", "plot_levels", "run_command", "summarize_levels", "LEVEL_SUMMARIES", "EXPORT_FORMATS", "DEFAULT_EXPORTS"]

# "torch" pickles the module: loading it runs code, so it is written only on request
EXPORT_FORMATS = ("torchscript", "state", "onnx", "pt2", "torch")
#: formats of a deploy export (BatchNorm folded: no zoo architecture to rebuild from a state dict)
DEPLOY_FORMATS = ("pt2", "onnx", "torchscript", "torch")
DEFAULT_EXPORTS = ("torchscript", "state")
# which levels a run's summary describes (NNI metrics, Optuna objectives); an index works too
LEVEL_SUMMARIES = ("mean", "largest", "smallest")


def print_table(rows: list[dict[str, Any]], title: str) -> None:
    """Print level rows (width, MACs, params, latency, accuracy) as a rich table."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    columns = [c for c in ("level", "width", "budget", "macs", "macs_ratio", "params", "latency_ms", "accuracy") if any(c in r for r in rows)]
    for c in columns:
        table.add_column(c, justify="right")
    for r in rows:
        table.add_row(*[_fmt(c, r.get(c)) for c in columns])
    Console(file=sys.stdout, width=120).print(table)


def _fmt(column: str, value: Any) -> str:
    if value is None:
        return "-"
    if column in ("macs", "params"):
        return f"{value / 1e6:.3f}M"
    if column in ("macs_ratio", "accuracy"):
        return f"{100 * value:.1f}%"
    if column == "latency_ms":
        return f"{value:.3f}"
    if column == "width" and isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def save_module(module: torch.nn.Module, stem: Path, example: torch.Tensor,
                formats: Sequence[str] = DEFAULT_EXPORTS) -> list[Path]:
    """Write a compact module atomically, in each of ``formats``:

    - ``pt2``: ``torch.export`` program (``torch.export.load(path).module()``; the format torch 2.13
      recommends, batch size dynamic), ``stem.pt2``;
    - ``onnx``: for ONNX Runtime and other engines, ``stem.onnx``;
    - ``torchscript``: ``stem.ts`` (deprecated by torch 2.13, kept for C++/mobile runtimes);
    - ``state``: weights + zoo architecture, :func:`nni_elastic.load_compact`, ``stem.state.pt``;
    - ``torch``: the pickled module, ``stem.pt`` (loading it runs code: only on request).
    """
    unknown = sorted(set(formats) - set(EXPORT_FORMATS))
    if unknown:
        raise ValueError(f"unknown export format(s) {unknown}; use {', '.join(EXPORT_FORMATS)}")
    written = []
    if "torch" in formats:
        written.append(atomic_save(module, stem.with_suffix(".pt")))
    if "state" in formats:
        written.append(save_compact(module, stem.with_name(stem.name + ".state.pt")))
    if "torchscript" in formats:
        with warnings.catch_warnings():  # torch 2.13 marks TorchScript deprecated; still the portable format
            warnings.simplefilter("ignore", DeprecationWarning)
            scripted = torch.jit.trace(module, example)
        written.append(atomic_write(stem.with_suffix(".ts"), lambda fh: torch.jit.save(scripted, fh)))
    if "pt2" in formats:
        batch = torch.export.Dim("batch", min=1, max=65536)
        program = torch.export.export(module, (torch.cat([example, example]),), dynamic_shapes=({0: batch},))
        written.append(atomic_write(stem.with_suffix(".pt2"), lambda fh: torch.export.save(program, fh)))
    if "onnx" in formats:
        buffer = io.BytesIO()
        with warnings.catch_warnings():  # the TorchScript exporter is fast and quiet; torch marks it legacy
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                module, (example,), buffer, input_names=["input"], output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False,
            )
        written.append(atomic_write(stem.with_suffix(".onnx"), lambda fh: fh.write(buffer.getvalue())))
    return written


def check_export_formats(formats: Sequence[str], deploy: bool = False) -> None:
    """One clear error for an unknown format, or a format a deploy export cannot be written in."""
    unknown = sorted(set(formats) - set(EXPORT_FORMATS))
    if unknown or not formats:
        raise ValueError(f"unknown export format(s) {unknown}; use {', '.join(EXPORT_FORMATS)}")
    bad = [f for f in formats if deploy and f not in DEPLOY_FORMATS]
    if bad:
        raise ValueError(f"deploy exports cannot be written as {bad}: folding BatchNorm changes the architecture, "
                         f"so a state dict has no zoo model to load into; use {', '.join(DEPLOY_FORMATS)}")


def save_exports(em: Any, out_dir: Path, formats: Sequence[str] = DEFAULT_EXPORTS, *, deploy: bool = False,
                 batch_size: int = 1) -> list[Path]:
    """Write every level's compact export into ``out_dir`` (formats as in :func:`save_module`).

    ``deploy=True`` writes deploy exports (BatchNorm folded, memory format measured at
    ``batch_size``; see ``ElasticModel.export``) in the formats of :data:`DEPLOY_FORMATS`.
    """
    check_export_formats(formats, deploy)
    example = torch.zeros((1, *em.example_shape[1:]))
    written = []
    for level in em.levels:
        module = em.export(level.index, deploy=deploy, batch_size=batch_size).cpu()
        written += save_module(module, Path(out_dir) / f"level{level.index}", example, formats)
    return written


def plot_levels(rows: list[dict[str, Any]], path: Path, title: str) -> Optional[Path]:
    """Accuracy vs MACs of the levels, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(r["macs"], r["accuracy"], r["width"]) for r in rows if r.get("accuracy") is not None]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([p[0] / 1e6 for p in pts], [100 * p[1] for p in pts], "o-")
    for macs, acc, width in pts:
        ax.annotate(f"{width:g}" if isinstance(width, float) else "", (macs / 1e6, 100 * acc), textcoords="offset points", xytext=(4, -10))
    ax.set_xlabel("MACs (M, batch 1)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        atomic_write(path, lambda fh: fig.savefig(fh, dpi=120, format="png"))
    finally:
        plt.close(fig)
    return path


def run_command(prog: str, func: Callable[[], int], *, with_type: bool = False) -> int:
    """Run a command; a user error (bad value, missing or unwritable file) is one line on stderr and exit code 2.

    The one error wrapper of every entry point (``nni-elastic``, ``python -m nni_elastic.nni.*``).
    ``with_type``: name the exception type too (NNI trial logs).
    """
    try:
        return func()
    except (ValueError, FileNotFoundError) as exc:
        kind = f"{type(exc).__name__}: " if with_type else ""
        print(f"{prog}: error: {kind}{exc}", file=sys.stderr, flush=True)
        return 2
    except OSError as exc:  # a file we were told to read or write: name it, not a traceback
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"{prog}: error: {where}{exc.strerror or exc}; check the path and its permissions", file=sys.stderr,
              flush=True)
        return 2


def summarize_levels(rows: Sequence[Mapping[str, Any]], level: Union[str, int] = "mean") -> dict[str, Optional[float]]:
    """Accuracy, MACs, params and latency of the levels ``level`` selects, averaged; ratios to the largest level.

    ``level``: ``mean`` (every level), ``largest``, ``smallest`` or an index (negative counts from the
    largest). A value some selected row lacks is None. The one summary behind the NNI trial metric and
    the Optuna objectives. Example: ``summarize_levels(result.rows)["accuracy"]``.
    """
    if not rows:
        raise ValueError("the run produced no levels to summarise")
    if isinstance(level, int) and not isinstance(level, bool):
        if not -len(rows) <= level < len(rows):
            raise ValueError(f"--level {level}: the run has {len(rows)} levels (0..{len(rows) - 1})")
        chosen = [rows[level]]
    elif level in LEVEL_SUMMARIES:
        chosen = {"mean": list(rows), "largest": [rows[-1]], "smallest": [rows[0]]}[level]
    else:
        raise ValueError(f"unknown metric {level!r}; use one of {list(LEVEL_SUMMARIES)} or a level index")
    full_macs, full_params = rows[-1].get("macs") or 1, rows[-1].get("params") or 1

    def avg(key: str, scale: float = 1.0) -> Optional[float]:
        values = [r.get(key) for r in chosen]
        return None if any(v is None for v in values) else statistics.fmean(values) / scale

    return {
        "accuracy": avg("accuracy"), "macs": avg("macs"), "macs_ratio": avg("macs", full_macs),
        "params": avg("params"), "params_ratio": avg("params", full_params), "latency_ms": avg("latency_ms"),
    }
