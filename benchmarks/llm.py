"""The LLM benchmark: every method on the shipped LoRAs of one offline model, IterIS tuned on validation.

    ITERIS_PROFILE=cpu python benchmarks/llm.py --model minilm     # or smollm2
writes benchmarks/results/<model>.json (every number), <model>.md (the table) and docs/<model>_scores.png.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from iteris_lab.tracks.harness import run_bench

ROOT = Path(__file__).resolve().parent.parent
# SmolLM2 merges cost ~40 forward passes per solve on CPU: its validation grid is the two published λ variants
# at the paper's α = 1e-4.
GRIDS = {"minilm": None, "smollm2": {"alpha": (1e-4,), "adaptive_weights": ("official", "paper")}}


def score_plot(out: dict, path: Path) -> None:
    from iteris_lab.viz.plots import plot_scores

    skip = ("base",)
    table = [{"method": r["label"], "task": t, "normalized": v} for r in out["results"]
             if r["method"] not in ("lora",) and r["label"] not in skip for t, v in r["normalized"].items()]
    figure = plot_scores(table, title=f"{out['model']}: normalized accuracy (merged / own LoRA)")
    figure.savefig(path, dpi=120, bbox_inches="tight")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("minilm", "smollm2"), default="minilm")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = run_bench(model=args.model, json_path=out_dir / f"{args.model}.json", grid=GRIDS[args.model])
    score_plot(out, ROOT / "docs" / f"{args.model}_scores.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
