"""NNI NAS on digits: search per-stage widths of a trained elastic model, then grow a CNN by expansion score.

    nni-elastic run strategies/prune_and_grow/digits.yaml          # writes runs/prune_and_grow/digits/elastic.pt
    python search_spaces/nas_digits.py [--checkpoint PATH] [--trials 30] [--max-macs 0.5] [--port 8081]
                                       [--engine ts|sequential] [--growth-trials 6] [--threshold 0.03]

Part 1 runs ``NasExperiment(ElasticSpace, ElasticEvaluator, RegularizedEvolution)``: every trial is a
subnet on the checkpoint's shared weights (BatchNorm recalibrated), shown in NNI's web UI
(``--engine ts``, the default: http://localhost:PORT while it runs) or run in this process
(``--engine sequential``: no web UI, no process per trial). Part 2 runs
``ExpansionGrowthStrategy`` over ``GrowableSpace`` (``--growth-trials 0`` skips it). A few
minutes on 2 cores. Experiments are stopped on exit, also on failure.
"""
from __future__ import annotations

import argparse
import json
import socket
import sys
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(exp, port: int, engine: str, top_k: int = 1):
    """Run ``exp``, return its top samples; always stop it."""
    try:
        exp.run(port=port)
        return exp.export_top_models(top_k=top_k, formatter="dict")
    finally:
        exp.stop()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="runs/prune_and_grow/digits/elastic.pt")
    p.add_argument("--trials", type=int, default=30)
    p.add_argument("--max-macs", type=float, default=0.5)
    p.add_argument("--population", type=int, default=8)
    p.add_argument("--sample-size", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--port", type=int, default=None, help="NNI web UI port (default: a free one)")
    p.add_argument("--engine", choices=("ts", "sequential"), default="ts")
    p.add_argument("--growth-trials", type=int, default=6)
    p.add_argument("--threshold", type=float, default=0.03)
    p.add_argument("--check-every", type=int, default=30)
    p.add_argument("--out", default="runs/nas_digits")
    args = p.parse_args(argv)

    from nni.nas.experiment import NasExperiment, NasExperimentConfig
    from nni.nas.strategy import RegularizedEvolution

    from nni_elastic.nni.nas import (ElasticEvaluator, ElasticSpace, ExpansionGrowthStrategy, GrowableSpace,
                                     GrowthEvaluator)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def config(space, evaluator, strategy, trials):
        cfg = (NasExperimentConfig("sequential", "simplified") if args.engine == "sequential"
               else NasExperimentConfig.default(space, evaluator, strategy))
        cfg.max_trial_number = trials
        if args.engine == "sequential":
            cfg.execution_engine.max_model_count = trials
        return cfg

    if args.trials > 0:
        space = ElasticSpace.from_checkpoint(args.checkpoint)
        evaluator = ElasticEvaluator(max_macs=args.max_macs)
        strategy = RegularizedEvolution(population_size=args.population, sample_size=args.sample_size, seed=args.seed)
        exp = NasExperiment(space, evaluator, strategy, config(space, evaluator, strategy, args.trials))
        best = run(exp, args.port or free_port(), args.engine)[0]
        metric = evaluator.evaluate(space.freeze(best))  # the best subnet's full metric dict (cached or recomputed)
        compact = space.export(best)
        import torch

        torch.save(compact.state_dict(), out / "best_subnet.state_dict.pt")
        (out / "best_subnet.json").write_text(json.dumps({"widths": best, **metric}, indent=1))
        print(f"best subnet: {best} accuracy {metric['accuracy']:.4f} macs_ratio {metric['macs_ratio']:.3f} "
              f"-> {out / 'best_subnet.json'}")

    if args.growth_trials > 0:
        strategy = ExpansionGrowthStrategy(threshold=args.threshold, damping=1.0, check_every=args.check_every,
                                           checkpoint_dir=out / "growth", seed=args.seed)
        space, evaluator = GrowableSpace(), GrowthEvaluator(data="digits")
        exp = NasExperiment(space, evaluator, strategy, config(space, evaluator, strategy, args.growth_trials))
        run(exp, args.port or free_port(), args.engine)
        for i, step in enumerate(strategy.history):
            print(f"growth {i}: {step.sample} accuracy {step.metric['accuracy']:.4f} params {step.metric['params']} "
                  f"best gain {step.gains.get(step.best, float('nan')):.4f} ({step.best})")
        print(f"stopped: {strategy.stop_reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
