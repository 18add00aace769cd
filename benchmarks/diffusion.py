"""The diffusion benchmark: every merge of the shipped concept LoRAs, IterIS tuned on validation prompts/noises.

    ITERIS_PROFILE=cpu python benchmarks/diffusion.py
writes benchmarks/results/diffusion.json (every number), diffusion.md (the table), docs/diffusion_scores.png and
docs/diffusion_grid.png (samples of every model for prompts asking for both concepts).
Validation = other prompt templates and other start noises (seed 1) than the test (seed 0), half as many samples. The validation score
is mean fidelity on "both" prompts minus mean leakage; content accuracy breaks ties.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from iteris_lab.measure import weights_added
from iteris_lab.profiles import current_profile
from iteris_lab.tracks.diffusion import diffusion as dm
from iteris_lab.tracks.diffusion.benchmark import (METHODS, calibration, load_diffusion_track, markdown_table,
                                                   merge_and_measure, prompts_for, references, run_methods, summary_row)
from iteris_lab.tracks.harness import environment, method_specs

ROOT = Path(__file__).resolve().parent.parent
GRID = {"alpha": (1e-4, 1e-2), "adaptive_weights": ("official", "none")}
SAMPLES = {"ci": 40, "cpu": 200, "gpu": 500}  # images per prompt set


def choose_iteris(track, profile, n: int) -> tuple[dict, list]:
    base, own = references(track, n, seed=1)
    calib = {profile.calibration_samples: [calibration(track, c, profile.calibration_samples) for c in track.adapters]}
    tried = []
    for alpha in GRID["alpha"]:
        for weights in GRID["adaptive_weights"]:
            spec = method_specs(profile, {"alpha": alpha, "adaptive_weights": weights})["iteris"]
            _, metrics, _, _ = merge_and_measure(track, spec, calib, n, seed=1)
            row = summary_row("iteris", "iteris", metrics, base, own)
            score = row["mean_fidelity"] - row["mean_leakage"]
            tried.append({"alpha": alpha, "adaptive_weights": weights, "val_score": score,
                          "val_content": row["content"], "val_fidelity": row["fidelity"], "val_leakage": row["leakage"]})
            print(f"validation alpha={alpha} weights={weights}: score {score:.3f} content {row['content']:.3f}", flush=True)
    best = max(tried, key=lambda r: (round(r["val_score"], 3), r["val_content"]))
    return {"alpha": best["alpha"], "adaptive_weights": best["adaptive_weights"]}, tried


def grid_figure(track, profile, chosen: dict, path: Path) -> None:
    from iteris_lab.adapters import load_adapter
    from iteris_lab.merge import merge_loras
    from iteris_lab.viz.plots import plot_image_grid

    prompts, digits = prompts_for(tuple(track.adapters), 10)
    rows = {"base": dm.sample(track.unet, track.encoder, prompts)}
    for c, p in track.adapters.items():
        with weights_added(track.unet, load_adapter(p).layers):
            rows[f"LoRA {c}"] = dm.sample(track.unet, track.encoder, prompts)
    calib = [calibration(track, c, profile.calibration_samples) for c in track.adapters]
    for label, spec in (("linear", {"method": "linear"}), ("task arithmetic", {"method": "task_arithmetic"}),
                        ("regmean", {"method": "regmean"}),
                        ("iteris", {"method": "iteris", "max_iter": profile.max_iter, **chosen})):
        result = merge_loras(track.unet, list(track.adapters.values()), calib, progress=False, **spec)
        with weights_added(track.unet, result.deltas):
            rows[label] = dm.sample(track.unet, track.encoder, prompts)
    figure = plot_image_grid(rows, columns=digits.tolist(), title="prompt asks for both concepts (thick + slant)")
    figure.savefig(path, dpi=120, bbox_inches="tight")


def score_plot(rows: list[dict], path: Path) -> None:
    from iteris_lab.viz.plots import plot_bars

    table = [{"method": r["label"], "measure": f"{c} {kind}", "level": r[kind][c]}
             for r in rows if r["method"] != "lora" for kind in ("fidelity", "leakage") for c in r["fidelity"]]
    figure = plot_bars(table, x="measure", y="level", hue="method", reference=1.0,
                       title="concept level (0 = base, 1 = own LoRA): asked for both, and leaked where not asked")
    figure.savefig(path, dpi=120, bbox_inches="tight")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--threads", type=int, default=int(os.environ.get("ITERIS_THREADS", 1)))
    parser.add_argument("--samples", type=int, default=None, help="images per prompt set")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start, profile = time.perf_counter(), current_profile()
    n = args.samples or SAMPLES[profile.name]
    track = load_diffusion_track()
    chosen, tried = choose_iteris(track, profile, max(20, n // 2))
    rows = run_methods(track, profile, n, METHODS, iteris=chosen)
    out = {"model": "diffusion", "profile": profile.name, "samples_per_prompt_set": n, "sampler": "DDIM 25, guidance 1",
           "calibration_timesteps": list(dm.CALIBRATION_TIMESTEPS), "judge_held_out": track.judge.held_out,
           "base_recipe": dm.recipe(dm.DATA / "base"), "iteris_chosen": chosen, "iteris_validation": tried,
           "environment": environment(), "results": rows, "seconds": time.perf_counter() - start}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "diffusion.json").write_text(json.dumps(out, indent=2, default=str))
    (out_dir / "diffusion.md").write_text(markdown_table(rows) + "\n")
    score_plot(rows, ROOT / "docs" / "diffusion_scores.png")
    grid_figure(track, profile, chosen, ROOT / "docs" / "diffusion_grid.png")
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
