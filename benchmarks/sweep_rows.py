"""Add rows to a measured benchmark without re-running it: today the IterIS sweep (schedule="sweep") with the IterIS
settings that benchmark chose on validation, evaluated on the same test sets.

    ITERIS_PROFILE=cpu python benchmarks/sweep_rows.py --track minilm      # or smollm2, vlm, diffusion
The base and own-LoRA references are read from the JSON (same seeds, same test sets), so only the new merges run.
The new rows carry "added_in_later_run": their merge time and memory come from another process and another
machine load than the rest of the table: compare them with each other, not with the older rows.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def llm_rows(name: str, out: dict, labels: list[str]) -> list[dict]:
    from iteris_lab.profiles import current_profile
    from iteris_lab.tracks.harness import load_track, run_methods

    track = load_track(name)
    own = {t: next(r for r in out["results"] if r["label"] == f"lora:{t}")["accuracy"][t] for t in track.tasks}
    return run_methods(track, current_profile(), labels, iteris=out["iteris_chosen"], progress=False, own=own)


def vlm_rows(out: dict, labels: list[str]) -> list[dict]:
    import dataclasses

    from iteris_lab.profiles import current_profile
    from iteris_lab.tracks.vlm import benchmark as vlm_bench

    settings = out["settings"]
    profile = dataclasses.replace(current_profile(), test_limit=settings["test_images"])
    track = vlm_bench.load_vlm_track()
    own = out["own_lora"]
    return vlm_bench.run_methods(track, profile, labels, own, iteris=out["iteris_chosen"],
                                 mask=settings["calibration_mask"])


def diffusion_rows(out: dict, labels: list[str]) -> list[dict]:
    from iteris_lab.profiles import current_profile
    from iteris_lab.tracks.diffusion.benchmark import (calibration, load_diffusion_track, merge_and_measure,
                                                       summary_row)
    from iteris_lab.tracks.harness import method_specs

    profile, track = current_profile(), load_diffusion_track()
    by = {r["label"]: r for r in out["results"]}
    base, own = by["base"]["metrics"], {c: by[f"lora:{c}"]["metrics"] for c in track.adapters}
    specs, calib, rows = method_specs(profile, out["iteris_chosen"]), {}, []
    for label in labels:
        samples = specs[label].get("samples", 0)
        if samples and samples not in calib:
            calib[samples] = [calibration(track, c, samples) for c in track.adapters]
        result, metrics, peak, samples = merge_and_measure(track, specs[label], calib, out["samples_per_prompt_set"])
        row = summary_row(label, specs[label]["method"], metrics, base, own)
        row.update(calibration_samples=samples, merge_seconds=result.seconds, peak_memory_mb=peak,
                   settings={k: v for k, v in result.settings.items() if k != "adapters"})
        rows.append(row)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--track", choices=("minilm", "smollm2", "vlm", "diffusion"), required=True)
    parser.add_argument("--labels", nargs="+", default=["iteris_sweep"])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    path = RESULTS / f"{args.track}.json"
    out = json.loads(path.read_text())
    start = time.perf_counter()
    if args.track == "vlm":
        rows = vlm_rows(out, args.labels)
    elif args.track == "diffusion":
        rows = diffusion_rows(out, args.labels)
    else:
        rows = llm_rows(args.track, out, args.labels)
    for row in rows:
        row["added_in_later_run"] = time.strftime("%Y-%m-%d")
    out["results"] = [r for r in out["results"] if r["label"] not in args.labels] + rows
    out.setdefault("later_runs", []).append({"labels": args.labels, "seconds": time.perf_counter() - start,
                                             "date": time.strftime("%Y-%m-%d %H:%M")})
    path.write_text(json.dumps(out, indent=2) + "\n")
    if args.track == "vlm":
        rewrite_vlm_table(out)
    if args.track == "diffusion":
        from iteris_lab.tracks.diffusion.benchmark import markdown_table

        (RESULTS / "diffusion.md").write_text(markdown_table(out["results"]) + "\n")
    print(json.dumps(rows, indent=1)[:2000])
    return 0


def rewrite_vlm_table(out: dict) -> None:
    """vlm.md keeps its header and run note; its table is rendered again from every row, with the later rows named."""
    import sys

    from iteris_lab.tracks.vlm import benchmark as vlm_bench

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from results_md import later_rows_note

    page = RESULTS / "vlm.md"
    head = page.read_text().split("\n| ", 1)[0].rstrip()
    page.write_text("\n\n".join([head, vlm_bench.markdown_table(out["results"]), *later_rows_note(out["results"])]))


if __name__ == "__main__":
    raise SystemExit(main())
