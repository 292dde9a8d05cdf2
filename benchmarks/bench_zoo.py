"""Zoo coverage of the elastic core: every torchvision classifier, wrapped as it is.

Per model (weights=None, eval mode, seeded, batch 1, 3x64x64 by default): does ElasticModel wrap it
as it is (unsupported="error"), only with fallback (unsupported="keep": some groups kept at full
width), or not at all (and why)? Checked here, independently of the library's own self-check: the
full level equals the original model, level 0 equals its export ``em.export(0)``; plus the level-0
MACs ratio, elastic vs fixed channel groups, wrap time, and whether torch-pruning alone can prune
the model (uniform 50 %, classifier ignored). Also times wrapping ResNet-50 at 224x224 (median of 3).

Targets: every model torch-pruning handles wraps without ignored_layers; level 0 at width 0.25
keeps <= 15 % of the MACs on >= 90 % of the CNNs (transformers exempt); ResNet-50 wraps in < 10 s.

torchvision is not a dependency of nni-elastic; install it for this benchmark only:

    pip install --no-deps --target /opt/tv torchvision==0.28.0   # not site-packages: NNI imports it
    PYTHONPATH=/opt/tv OMP_NUM_THREADS=1 python benchmarks/bench_zoo.py --out benchmarks/results/zoo.json

Each model runs in its own subprocess with a time limit (``--timeout``), so a hang or a crash in
one model cannot stop the others.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
import types
import warnings
from pathlib import Path

# more than ~150M parameters: too big for a CPU coverage run (from torchvision's weight metadata)
MAX_PARAMS = 150e6
TRANSFORMER_PREFIXES = ("vit_", "swin_", "maxvit_")
# models that cannot run at the default size: (constructor kwargs, input size, why)
SPECIAL = {
    "inception_v3": ({}, 75, "needs >= 75x75 input"),
    "maxvit_t": ({}, 224, "needs 224x224 (every stage must divide by its 7x7 partition)"),
}
TOL = 1e-4  # relative max-abs error allowed between float32 computations that should agree


def import_torchvision():
    """torchvision's pure-Python model definitions, without its compiled ops (a CUDA build beside CPU torch)."""
    for name in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
        sys.modules.setdefault(name, types.ModuleType(name))
    try:
        import torchvision  # noqa: F401
    except ImportError:
        print(
            "torchvision is missing: pip install --no-deps --target /opt/tv torchvision==0.28.0, then run with "
            "PYTHONPATH=/opt/tv (benchmark only; installed beside the CPU torch it breaks `import nni.compression`)"
        )
        sys.exit(2)
    return torchvision


def zoo(tv) -> tuple[list[str], dict[str, int]]:
    """(models to run, {skipped giant: params})."""
    names = tv.models.list_models(module=tv.models)
    params = {n: tv.models.get_model_weights(n).DEFAULT.meta["num_params"] for n in names}
    run = [n for n in names if params[n] <= MAX_PARAMS]
    return run, {n: params[n] for n in names if params[n] > MAX_PARAMS}


def build(tv, name: str, size: int):
    """(model, input, note) for one classifier at ``size`` (or the size it needs)."""
    import torch

    kwargs, note = {}, ""
    if name in SPECIAL:
        kwargs, size, note = SPECIAL[name]
    elif name.startswith("vit_"):
        kwargs, note = {"image_size": size}, f"image_size={size}"
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tv.models.get_model(name, weights=None, **kwargs).eval()
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    return model, x, size, note


def rel_err(a, b) -> float:
    import torch

    a, b = a.detach().double(), b.detach().double()
    if a.shape != b.shape:
        return float("inf")
    scale = b.abs().max().clamp_min(1e-30)
    return float((a - b).abs().max() / scale)


def classify(exc: BaseException) -> tuple[str, str]:
    """(kind, one-line reason) of an exception raised while wrapping."""
    import nni_elastic as ne

    msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if isinstance(exc, ne.UnsupportedModuleError):
        return "unsupported", msg
    if isinstance(exc, ValueError):
        if "could not trace" in msg:
            return "trace", msg
        if "no elastic channel group" in msg:
            return "no_groups", msg
        return "value_error", msg
    return "crash", f"{type(exc).__name__}: {msg}"


def wrap(model, x, unsupported: str):
    """(ElasticModel or None, seconds, exception or None, warnings caught)."""
    import nni_elastic as ne

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        try:
            em = ne.ElasticModel(model, x, widths=(0.25, 0.5, 0.75, 1.0), unsupported=unsupported)
            exc = None
        except Exception as e:  # noqa: BLE001 -- classified by the caller
            em, exc = None, e
        seconds = time.perf_counter() - start
    kept = [str(w.message) for w in caught if "keeps" in str(w.message)]
    return em, seconds, exc, kept


def tp_handles(model, x) -> tuple[bool, str]:
    """Can torch-pruning alone prune ``model`` (uniform 50 %, 1000-class output layer ignored) and run it?"""
    import torch
    import torch_pruning as tp

    try:
        m = copy.deepcopy(model)
        heads = [mod for mod in m.modules() if (isinstance(mod, torch.nn.Linear) and mod.out_features == 1000)
                 or (isinstance(mod, torch.nn.Conv2d) and mod.out_channels == 1000)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pruner = tp.pruner.MagnitudePruner(m, x, importance=tp.importance.MagnitudeImportance(p=1),
                                               pruning_ratio=0.5, ignored_layers=heads)
            pruner.step()
            with torch.no_grad():
                y = m(x)
        if tuple(y.shape) != (1, 1000):
            return False, f"output shape {tuple(y.shape)}"
        return True, ""
    except Exception as e:  # noqa: BLE001
        return False, f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"


def measure(tv, name: str, size: int, check_tp: bool) -> dict:
    """Everything about one model (runs in a worker subprocess)."""
    import torch
    import torch_pruning as tp

    model, x, size, note = build(tv, name, size)
    row = {"model": name, "transformer": name.startswith(TRANSFORMER_PREFIXES), "size": size, "note": note,
           "params": sum(p.numel() for p in model.parameters())}
    original = copy.deepcopy(model).eval()
    if check_tp:
        row["tp_handles"], row["tp_reason"] = tp_handles(original, x)
    em, seconds, exc, _ = wrap(model, x, "error")
    row["wrap_s"] = seconds
    if exc is None:
        row["status"] = "as_is"
    else:
        kind, reason = classify(exc)
        row["error_kind"], row["error"] = kind, reason[:400]
        if kind == "crash":
            row["traceback"] = traceback.format_exception(exc)[-6:]
        if kind != "unsupported":
            row["status"] = "fails"
            return row
        model, x, _, _ = build(tv, name, size)  # the failed wrap may have modified the model in place
        em, seconds, exc, kept = wrap(model, x, "keep")
        row["wrap_keep_s"] = seconds
        if exc is not None:
            kind, reason = classify(exc)
            row["status"], row["error_kind"], row["error"] = "fails", f"keep:{kind}", reason[:400]
            if kind == "crash":
                row["traceback"] = traceback.format_exception(exc)[-6:]
            return row
        row["status"] = "fallback"
        problems = dict(em.graph.problems)
        row["kept_groups"] = len(problems)
        row["kept_reasons"] = [f"{root}: {why[:160]}" for root, why in list(problems.items())[:3]]
        row["keep_warnings"] = len(kept)
    graph = em.graph
    row["elastic_groups"] = len(graph.groups)
    row["fixed_groups"] = len(graph.fixed)
    levels = em.levels
    row["macs_full"], row["macs_level0"] = levels[-1].macs, levels[0].macs
    row["params_level0"] = levels[0].params
    row["macs_ratio"] = levels[0].macs / levels[-1].macs
    em.eval()
    with torch.no_grad():
        # full level vs the untouched original (independent of the library's self-check)
        em.set_level(len(levels) - 1)
        y_full, y_orig = em(x), original(x)
        row["full_vs_original"] = rel_err(y_full, y_orig)
        # level 0 vs its physically pruned export
        em.set_level(0)
        y0 = em(x)
        exported = em.export(0).eval()
        row["level0_vs_export"] = rel_err(y0, exported(x))
        # recheck in float64 what float32 cannot settle
        if row["full_vs_original"] > TOL or row["level0_vs_export"] > TOL:
            em.double(); original.double(); exported.double()
            xd = x.double()
            em.set_level(len(levels) - 1)
            row["full_vs_original_f64"] = rel_err(em(xd), original(xd))
            em.set_level(0)
            row["level0_vs_export_f64"] = rel_err(em(xd), exported(xd))
            em.float(); original.float(); exported.float()
    # MACs counted here, on the original and on the export, vs the library's numbers
    macs_orig, _ = tp.utils.count_ops_and_params(original, x)
    macs_exp, _ = tp.utils.count_ops_and_params(exported, x)
    row["macs_original"], row["macs_export0"] = int(macs_orig), int(macs_exp)
    ok_full = min(row["full_vs_original"], row.get("full_vs_original_f64", 1.0)) <= TOL
    ok_l0 = min(row["level0_vs_export"], row.get("level0_vs_export_f64", 1.0)) <= TOL
    ok_macs = row["macs_original"] == row["macs_full"] and row["macs_export0"] == row["macs_level0"]
    row["checks_ok"] = bool(ok_full and ok_l0)  # outputs: full == original, level 0 == export
    row["macs_ok"] = bool(ok_macs)  # library's level MACs == MACs counted here on the original / on export(0)
    return row


def worker(args) -> int:
    tv = import_torchvision()
    if args.resnet50_timing:
        return resnet50_worker(tv, args)
    try:
        row = measure(tv, args.worker, args.size, not args.no_tp)
    except Exception as e:  # noqa: BLE001 -- a crash of the benchmark itself (e.g. in em(x) or export)
        row = {"model": args.worker, "status": "fails", "error_kind": "crash_after_wrap",
               "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}",
               "traceback": traceback.format_exception(e)[-6:]}
    print("ZOO_ROW " + json.dumps(row))
    return 0


def resnet50_worker(tv, args) -> int:
    import torch
    import nni_elastic as ne

    times = []
    for _ in range(3):
        torch.manual_seed(0)
        model = tv.models.resnet50(weights=None).eval()
        x = torch.randn(1, 3, 224, 224)
        start = time.perf_counter()
        ne.ElasticModel(model, x, widths=(0.25, 0.5, 0.75, 1.0))
        times.append(time.perf_counter() - start)
    print("ZOO_ROW " + json.dumps({"runs_s": times, "median_s": statistics.median(times)}))
    return 0


def run_worker(extra: list[str], timeout: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), *extra]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "error": f"no result within {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("ZOO_ROW "):
            return json.loads(line[len("ZOO_ROW "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"status": "fails", "error_kind": "worker_died", "error": f"exit {proc.returncode}: {' | '.join(tail)[:300]}"}


def short(text: str, n: int = 70) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def print_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="torchvision zoo: ElasticModel coverage (level 0 = width 0.25)")
    for col, kw in [("model", {}), ("T", {}), ("status", {}), ("tp", {}), ("groups e/f", {"justify": "right"}),
                    ("L0 MACs", {"justify": "right"}), ("full=orig", {"justify": "right"}),
                    ("L0=export", {"justify": "right"}), ("wrap s", {"justify": "right"}), ("why", {})]:
        t.add_column(col, **kw)
    for r in rows:
        st = r["status"]
        color = {"as_is": "green", "fallback": "yellow"}.get(st, "red")
        why = r.get("error", "") if st != "fallback" else f"{r['kept_groups']} kept: {r['kept_reasons'][0] if r['kept_reasons'] else ''}"
        has = "elastic_groups" in r
        wrap_s = r.get("wrap_keep_s", r.get("wrap_s"))
        t.add_row(
            r["model"], "T" if r.get("transformer") else "", f"[{color}]{st}[/]",
            {True: "yes", False: "no"}.get(r.get("tp_handles"), "-"),
            f"{r['elastic_groups']}/{r['fixed_groups']}" if has else "-",
            f"{r['macs_ratio']:.1%}" if has else "-",
            f"{r['full_vs_original']:.1e}" if has else "-",
            f"{r['level0_vs_export']:.1e}" if has else "-",
            f"{wrap_s:.1f}" if wrap_s is not None else "-",
            short(why) + ("" if r.get("checks_ok", True) else " [red]OUTPUT CHECK FAILED[/]")
            + ("" if r.get("macs_ok", True) else " [magenta]MACs differ[/]"),
        )
    Console(width=200).print(t)


def summarize(rows: list[dict], skipped: dict, resnet50: dict | None) -> dict:
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    cnn_ratios = {r["model"]: r["macs_ratio"] for r in rows if not r.get("transformer") and "macs_ratio" in r}
    # the same ratio from MACs counted here (torch-pruning on em.export(0) and on the original model)
    here = {r["model"]: r["macs_export0"] / r["macs_original"] for r in rows
            if not r.get("transformer") and r.get("macs_original")}
    within_here = sum(v <= 0.15 for v in here.values())
    cnns = [r for r in rows if not r.get("transformer")]
    within = sum(v <= 0.15 for v in cnn_ratios.values())
    tp_ok = [r["model"] for r in rows if r.get("tp_handles")]
    tp_ok_not_as_is = [m for m in tp_ok if next(r for r in rows if r["model"] == m)["status"] != "as_is"]
    summary = {
        "counts": counts, "skipped": len(skipped), "models": len(rows),
        "cnns": len(cnns), "cnn_level0_macs_le_15pct": within,
        "cnn_level0_macs_le_15pct_share_of_cnns": within / len(cnns) if cnns else None,
        "cnn_level0_macs_le_15pct_share_of_wrapped_cnns": within / len(cnn_ratios) if cnn_ratios else None,
        "cnn_level0_macs_ratio_median": statistics.median(cnn_ratios.values()) if cnn_ratios else None,
        "cnn_level0_macs_ratio_max": max(cnn_ratios.values()) if cnn_ratios else None,
        "cnn_over_15pct": {m: round(v, 4) for m, v in sorted(cnn_ratios.items()) if v > 0.15},
        "cnn_level0_macs_le_15pct_counted_here": within_here,
        "cnn_level0_macs_ratio_median_counted_here": statistics.median(here.values()) if here else None,
        "transformer_level0_macs_ratio": {r["model"]: round(r["macs_ratio"], 4) for r in rows
                                          if r.get("transformer") and "macs_ratio" in r},
        "fallbacks": {r["model"]: f"{r['kept_groups']} kept: {r['kept_reasons'][0][:200] if r['kept_reasons'] else ''}"
                      for r in rows if r["status"] == "fallback"},
        "failures": {r["model"]: f"{r.get('error_kind', r['status'])}: {r.get('error', '')[:200]}"
                     for r in rows if r["status"] not in ("as_is", "fallback")},
        "tp_handles": len(tp_ok) if any("tp_handles" in r for r in rows) else None,
        "tp_handles_but_not_as_is": tp_ok_not_as_is,
        "check_failures": [r["model"] for r in rows if r.get("checks_ok") is False],
        "macs_mismatches": {r["model"]: {"library_level0": r["macs_level0"], "export0_here": r["macs_export0"],
                                         "library_full": r["macs_full"], "original_here": r["macs_original"]}
                            for r in rows if r.get("macs_ok") is False},
        "crashes": [r["model"] for r in rows if "crash" in str(r.get("error_kind", "")) or r.get("error_kind") == "worker_died"],
        "resnet50_224_wrap_median_s": resnet50.get("median_s") if resnet50 else None,
    }
    summary["targets"] = {
        "tp_handled_wrap_as_is": not tp_ok_not_as_is if summary["tp_handles"] is not None else None,
        "cnn_level0_macs_le_15pct_on_90pct": (within / len(cnns) >= 0.9) if cnns else None,
        "resnet50_wrap_under_10s": (resnet50["median_s"] < 10) if resnet50 and "median_s" in resnet50 else None,
    }
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="", help="comma-separated subset (default: the whole zoo but the giants)")
    p.add_argument("--size", type=int, default=64, help="input height and width (default 64)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per model (default 120)")
    p.add_argument("--no-tp", action="store_true", help="skip the torch-pruning-alone check")
    p.add_argument("--no-resnet50", action="store_true", help="skip the ResNet-50 224x224 wrap timing")
    p.add_argument("--quiet", action="store_true", help="no per-model progress lines")
    p.add_argument("--out", default="benchmarks/results/zoo.json")
    p.add_argument("--from-json", help="re-print the table and summary of an earlier run's JSON (and rewrite it)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--resnet50-timing", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker or args.resnet50_timing:
        return worker(args)

    from nni_elastic.checkpoint import atomic_write_json

    if args.from_json:
        payload = json.loads(Path(args.from_json).read_text())
        print_table(payload["rows"])
        payload["summary"] = summarize(payload["rows"], payload["skipped"], payload.get("resnet50_224_wrap"))
        print(json.dumps(payload["summary"], indent=1))
        atomic_write_json(payload, args.from_json)
        return 0
    tv = import_torchvision()
    import torch
    import nni_elastic as ne

    names, skipped = zoo(tv)
    if args.models:
        wanted = [m.strip() for m in args.models.split(",") if m.strip()]
        unknown = [m for m in wanted if m not in names and m not in skipped]
        if unknown:
            p.error(f"unknown model(s) {unknown}; see torchvision.models.list_models()")
        names = wanted
    rows = []
    started = time.perf_counter()
    for i, name in enumerate(names, 1):
        t0 = time.perf_counter()
        extra = ["--worker", name, "--size", str(args.size)] + (["--no-tp"] if args.no_tp else [])
        row = {"model": name, "transformer": name.startswith(TRANSFORMER_PREFIXES), **run_worker(extra, args.timeout)}
        row["model"] = name
        rows.append(row)
        if not args.quiet:
            extra_info = f" L0 MACs {row['macs_ratio']:.1%}" if "macs_ratio" in row else f" {short(row.get('error', ''), 100)}"
            print(f"[{i}/{len(names)}] {name}: {row['status']}{extra_info} ({time.perf_counter() - t0:.0f} s)", flush=True)
    resnet50 = None
    if not args.no_resnet50:
        resnet50 = run_worker(["--resnet50-timing"], max(args.timeout, 300.0))
        if not args.quiet:
            print(f"resnet50 224x224 wrap: {resnet50}", flush=True)
    print_table(rows)
    summary = summarize(rows, skipped, resnet50)
    print(json.dumps(summary, indent=1))
    payload = {
        "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "torchvision": tv.__version__,
        "nni_elastic": getattr(ne, "__version__", None), "threads": os.environ.get("OMP_NUM_THREADS"),
        "size": args.size, "widths": [0.25, 0.5, 0.75, 1.0], "tolerance": TOL, "timeout_s": args.timeout,
        "max_params": MAX_PARAMS, "skipped": skipped, "special_sizes": {k: v[1] for k, v in SPECIAL.items()},
        "elapsed_s": time.perf_counter() - started, "resnet50_224_wrap": resnet50, "summary": summary, "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(payload, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
