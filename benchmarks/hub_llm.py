"""The paper's LLM setting on a GPU machine with internet: train (or reuse) one LoRA per GLUE task, merge them with
every method, evaluate, write JSON and a markdown table.

    ITERIS_PROFILE=gpu python benchmarks/hub_llm.py --model google/flan-t5-base --out runs/flan-t5-base
    ITERIS_PROFILE=gpu python benchmarks/hub_llm.py --model Qwen/Qwen2.5-0.5B --dtype bfloat16 --out runs/qwen

Needs `pip install datasets` for GLUE. LoRAs already under OUT/adapters/<task>/ are reused, not retrained.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from iteris_lab.tracks.hub.glue import GLUE  # noqa: E402
from iteris_lab.tracks.hub.llm import DEFAULT_METHODS, HubConfig  # noqa: E402

# command-line flag -> HubConfig field, for the settings one usually changes
OVERRIDES = {"tasks": "tasks", "train_steps": "train_steps", "lr": "lr", "calibration_samples": "calibration_samples",
             "max_iter": "max_iter", "alpha": "alpha", "adaptive_weights": "adaptive_weights", "n_test": "n_test",
             "dtype": "dtype", "seed": "seed", "max_length": "max_length", "eval_batch_size": "eval_batch_size"}


def build_parser() -> argparse.ArgumentParser:
    defaults = HubConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=defaults.model, help="hub id or local folder (seq2seq or causal LM)")
    parser.add_argument("--out", required=True, help="run folder: adapters/, hub_results.json, hub_results.md")
    parser.add_argument("--json", help="also write the report here")
    parser.add_argument("--tasks", nargs="+", choices=sorted(GLUE), help=f"default: {' '.join(defaults.tasks)}")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    parser.add_argument("--train-steps", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--calibration-samples", type=int)
    parser.add_argument("--max-iter", type=int)
    parser.add_argument("--alpha", type=float, help="IterIS α (default 1e-7, the official GLUE config)")
    parser.add_argument("--adaptive-weights", choices=("official", "paper", "none"))
    parser.add_argument("--n-test", type=int, help="test rows per task (default: the profile's; gpu: all)")
    parser.add_argument("--max-length", type=int)
    parser.add_argument("--eval-batch-size", type=int)
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--seed", type=int)
    parser.add_argument("--quiet", action="store_true")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from iteris_lab.tracks.harness import markdown_table
    from iteris_lab.tracks.hub.llm import hub_config, run_hub

    overrides = {field: getattr(args, flag) for flag, field in OVERRIDES.items() if getattr(args, flag) is not None}
    if "tasks" in overrides:
        overrides["tasks"] = tuple(overrides["tasks"])
    config = hub_config(model=args.model, **overrides)
    try:
        report = run_hub(config, args.out, methods=args.methods, progress=not args.quiet)
    except ModuleNotFoundError as err:  # `datasets` missing: say how to install it, without a traceback
        print(f"hub_llm: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    print(markdown_table(report["results"]))
    print(f"\n{config.model}: written to {Path(args.out) / 'hub_results.json'} in {report['timings']['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
