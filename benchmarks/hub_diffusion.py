"""Stable Diffusion 1.5 with two DreamBooth-style concept LoRAs on a GPU machine with internet: train (or reuse) the
LoRAs, merge them with every method, write each merge as a diffusers LoRA file, sample a grid per model, score
with CLIP, write JSON.

    ITERIS_PROFILE=gpu python benchmarks/hub_diffusion.py --out runs/sd15
    ITERIS_PROFILE=gpu python benchmarks/hub_diffusion.py --out runs/sd15 --conv --train-steps 800 --no-clip

Concept images come from the hub datasets named in iteris_lab.tracks.hub.diffusion.CONCEPTS; LoRAs already under
OUT/adapters/<concept>/ are reused, class images under OUT/class_images/<noun>/ too. A merged LoRA loads with
pipe.load_lora_weights("OUT/merged/<method>", weight_name="pytorch_lora_weights.safetensors").
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from iteris_lab.tracks.hub.diffusion import SDHubConfig  # noqa: E402

# command-line flag -> SDHubConfig field
OVERRIDES = {"model": "model", "resolution": "resolution", "rank": "rank", "train_steps": "train_steps", "lr": "lr",
             "class_images": "class_images", "calibration_images": "calibration_images", "max_iter": "max_iter",
             "alpha": "alpha", "adaptive_weights": "adaptive_weights", "export_rank": "export_rank",
             "sample_steps": "sample_steps", "samples_per_prompt": "samples_per_prompt", "guidance": "guidance",
             "dtype": "dtype", "seed": "seed"}


def build_parser() -> argparse.ArgumentParser:
    defaults = SDHubConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="run folder: adapters/, merged/, grids/, sd_hub_results.json")
    parser.add_argument("--model", help=f"hub id or local folder (default {defaults.model})")
    parser.add_argument("--methods", nargs="+", help=f"default: {' '.join(defaults.methods)}")
    parser.add_argument("--conv", action="store_true", help="also LoRA on resnet conv1/conv2 (large Grams)")
    parser.add_argument("--no-clip", action="store_true", help="skip CLIP scores (images and timings only)")
    parser.add_argument("--resolution", type=int)
    parser.add_argument("--rank", type=int)
    parser.add_argument("--train-steps", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--class-images", type=int, help="prior-preservation images per class (0 weight: off)")
    parser.add_argument("--calibration-images", type=int)
    parser.add_argument("--max-iter", type=int)
    parser.add_argument("--alpha", type=float, help="IterIS α")
    parser.add_argument("--adaptive-weights", choices=("official", "paper", "none"))
    parser.add_argument("--export-rank", type=int, help="truncated-SVD rank of the written merges (default exact)")
    parser.add_argument("--sample-steps", type=int)
    parser.add_argument("--samples-per-prompt", type=int)
    parser.add_argument("--guidance", type=float)
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--seed", type=int)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from iteris_lab.tracks.hub.diffusion import run_sd_hub, sd_hub_config

    overrides = {field: getattr(args, flag) for flag, field in OVERRIDES.items() if getattr(args, flag) is not None}
    if args.methods:
        overrides["methods"] = tuple(args.methods)
    if args.conv:
        overrides["conv"] = True
    if args.no_clip:
        overrides["clip_model"] = None
    config = sd_hub_config(**overrides)
    report = run_sd_hub(config, args.out)
    for row in report["references"] + report["results"]:
        scores = row["scores"]
        summary = " ".join(f"{p!r}: T {s['clip_t']:.3f} I {s['clip_i']}" for p, s in scores.items()) or row["grid"]
        print(f"{row['label']:>16}  {summary}")
    print(f"\n{config.model}: written to {Path(args.out) / 'sd_hub_results.json'} in "
          f"{report['timings']['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
