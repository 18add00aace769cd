"""The paper's vision–language setting on a GPU machine with internet: train (or reuse) one BLIP LoRA per caption
style, merge them with every method, caption the test images in every style, write JSON and a markdown table.

    ITERIS_PROFILE=gpu python benchmarks/hub_vlm.py --out runs/blip-styles
    ITERIS_PROFILE=gpu python benchmarks/hub_vlm.py --out runs/blip-styles --n-test 200 --dtype bfloat16

Needs `pip install datasets` for the caption data (default jxie/flickr8k, captions stylised into positive and
negative as a stand-in for SentiCap). LoRAs already under OUT/adapters/<style>/ are reused, not retrained.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from iteris_lab.tracks.hub.llm import DEFAULT_METHODS  # noqa: E402
from iteris_lab.tracks.hub.vlm import BLIP_PAPER, STYLE_WORDS  # noqa: E402

# command-line flag -> BlipHubConfig field, for the settings one usually changes
OVERRIDES = {"styles": "styles", "dataset": "dataset", "train_steps": "train_steps", "lr": "lr",
             "max_train": "max_train", "calibration_samples": "calibration_samples", "max_iter": "max_iter",
             "alpha": "alpha", "adaptive_weights": "adaptive_weights", "n_test": "n_test", "num_beams": "num_beams",
             "dtype": "dtype", "seed": "seed", "eval_batch_size": "eval_batch_size"}


def build_parser() -> argparse.ArgumentParser:
    defaults = BLIP_PAPER
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=defaults.model, help="hub id or local folder (BLIP model + processor)")
    parser.add_argument("--out", required=True, help="run folder: adapters/, blip_results.json, blip_results.md")
    parser.add_argument("--json", help="also write the report here")
    parser.add_argument("--styles", nargs="+", choices=sorted(STYLE_WORDS),
                        help=f"default: {' '.join(defaults.styles)}")
    parser.add_argument("--dataset", help=f"hub captioning dataset (default {defaults.dataset})")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    parser.add_argument("--train-steps", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--max-train", type=int, help="train images per style")
    parser.add_argument("--calibration-samples", type=int)
    parser.add_argument("--max-iter", type=int)
    parser.add_argument("--alpha", type=float, help="IterIS α (default 8e-7, the official BLIP config)")
    parser.add_argument("--adaptive-weights", choices=("official", "paper", "none"))
    parser.add_argument("--n-test", type=int, help="test images (default: the profile's; gpu: the whole split)")
    parser.add_argument("--num-beams", type=int)
    parser.add_argument("--eval-batch-size", type=int)
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--seed", type=int)
    parser.add_argument("--quiet", action="store_true")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from iteris_lab.tracks.hub.vlm import blip_hub_config, markdown_table, run_blip_hub

    overrides = {field: getattr(args, flag) for flag, field in OVERRIDES.items() if getattr(args, flag) is not None}
    if "styles" in overrides:
        overrides["styles"] = tuple(overrides["styles"])
    config = blip_hub_config(model=args.model, **overrides)
    try:
        report = run_blip_hub(config, args.out, methods=args.methods, progress=not args.quiet)
    except ModuleNotFoundError as err:  # `datasets` missing: say how to install it, without a traceback
        print(f"hub_vlm: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    print(markdown_table(report["results"]))
    written = Path(args.out) / "blip_results.json"
    print(f"\n{config.model}: written to {written} in {report['timings']['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
