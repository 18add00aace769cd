"""Reproduce the diffusion track's shipped weights from a seed (CPU, one thread by default).

    python scripts/train_diffusion.py base     # iteris_lab/data/diffusion/base: the UNet (EMA weights) + recipe.json
    python scripts/train_diffusion.py loras    # iteris_lab/data/diffusion/adapters/<concept>: one LoRA per concept
Each recipe.json records the hyper-parameters, the training time and loss, and the measured sample quality.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from iteris_lab.tracks.diffusion import diffusion as dm  # noqa: E402
from iteris_lab.tracks.diffusion.training import (BASE_RECIPE, LORA_RECIPE, _write_recipe,  # noqa: E402
                                                  train_base, train_concept_lora)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("base", "loras", "all"))
    parser.add_argument("--out", default=str(dm.DATA))
    parser.add_argument("--steps", type=int, default=None, help="override the recipe's step count")
    parser.add_argument("--max-seconds", type=float, default=None, help="stop the base training after this long")
    parser.add_argument("--concepts", nargs="*", default=list(dm.CONCEPTS))
    parser.add_argument("--threads", type=int, default=int(os.environ.get("ITERIS_THREADS", 1)))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    encoder = dm.TextEncoder()
    if args.what in ("base", "all"):
        changes = {k: v for k, v in (("steps", args.steps), ("max_seconds", args.max_seconds)) if v}
        recipe = replace(BASE_RECIPE, **changes)
        unet, log = train_base(encoder, recipe, out / "base")
        from iteris_lab.tracks.diffusion.benchmark import base_quality

        _write_recipe(out / "base", {"quality": base_quality(unet, encoder)})
        print(log)
    if args.what in ("loras", "all"):
        for concept in args.concepts:
            recipe = replace(LORA_RECIPE, **({"steps": args.steps} if args.steps else {}))
            log = train_concept_lora(out / "base", concept, encoder, out / "adapters" / concept, recipe)
            print(concept, log)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
