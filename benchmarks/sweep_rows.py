"""Add rows to a measured benchmark without re-running it: today the IterIS sweep (schedule="sweep") with the IterIS
settings that benchmark chose on validation, evaluated on the same test sets.

    ITERIS_PROFILE=cpu python benchmarks/sweep_rows.py --track minilm      # or smollm2, vlm, diffusion
The base and own-LoRA references are read from the JSON (same seeds, same test sets), so only the new merges run.
The new rows carry "added_in_later_run": their merge time and memory come from another process and another
machine load than the rest of the table: compare them with each other, not with the older rows.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from iteris_lab.profiles import current_profile
from iteris_lab.tracks import harness

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def track_and_references(name: str, out: dict):
    """The track as that benchmark ran it, a profile sized like its test sets, and its references from the JSON."""
    profile = current_profile()
    by = {r["label"]: r for r in out["results"]}
    if name == "vlm":
        from iteris_lab.tracks.vlm.benchmark import load_vlm_track

        track = dataclasses.replace(load_vlm_track(), mask=out["settings"]["calibration_mask"])
        limit = out["settings"]["test_images"]
        return track, dataclasses.replace(profile, test_limit=limit), harness.References.from_own(out["own_lora"])
    if name == "diffusion":
        from iteris_lab.tracks.diffusion.benchmark import load_diffusion_track

        track = load_diffusion_track()
        refs = harness.References(by["base"]["metrics"], {c: by[f"lora:{c}"]["metrics"] for c in track.adapters})
        return track, dataclasses.replace(profile, test_limit=out["samples_per_prompt_set"]), refs
    from iteris_lab.tracks.llm.track import load_track

    track = load_track(name)
    own = {t: by[f"lora:{t}"]["accuracy"][t] for t in track.tasks}
    return track, profile, harness.References.from_own(own)


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
    track, profile, refs = track_and_references(args.track, out)
    rows = harness.run_methods(track, profile, args.labels, iteris=out["iteris_chosen"], progress=False, refs=refs)
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

    from iteris_lab.tracks.vlm.benchmark import markdown_table

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from results_md import later_rows_note

    page = RESULTS / "vlm.md"
    head = page.read_text().split("\n| ", 1)[0].rstrip()
    page.write_text("\n\n".join([head, markdown_table(out["results"]), *later_rows_note(out["results"])]))


if __name__ == "__main__":
    raise SystemExit(main())
