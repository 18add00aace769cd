"""Re-measure an LLM benchmark's test rows with every example's outcome stored, keeping its validated IterIS settings.

    ITERIS_PROFILE=cpu python benchmarks/llm_outcomes.py --model minilm          # or smollm2
The validation grid is not run again: the settings it chose (and its scores) are read from
benchmarks/results/<model>.json, so only the test split is measured — the base model, each LoRA and every merge,
exactly what `iteris-lab bench` measures after its validation. Writes the bench's JSON (to --out, default the same
file) with per-example outcomes in every row and "validation_from" naming the run the settings came from; then
`python benchmarks/results_md.py` renders the intervals.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from iteris_lab.profiles import current_profile
from iteris_lab.tracks.harness import run_methods, to_json
from iteris_lab.tracks.llm.track import _on_gpu, load_track, report

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("minilm", "smollm2"), default="minilm")
    parser.add_argument("--out", help="JSON to write (default: benchmarks/results/<model>.json)")
    args = parser.parse_args(argv)
    source = ROOT / "benchmarks" / "results" / f"{args.model}.json"
    stored = json.loads(source.read_text())
    start, load = time.perf_counter(), os.getloadavg()
    profile = current_profile()
    track = _on_gpu(load_track(args.model))
    rows = run_methods(track, profile, iteris=stored["iteris_chosen"],
                       log=lambda text: print(time.strftime("%H:%M:%S"), text, flush=True))
    out = report(track, profile, rows, time.perf_counter() - start, iteris_validation=stored["iteris_validation"],
                 iteris_chosen=stored["iteris_chosen"],
                 validation_from={"profile": stored["profile"], "seconds": stored["seconds"],
                                  "note": "settings chosen on validation by that earlier run; test rows re-measured"},
                 load_average_start=[round(x, 2) for x in load],
                 load_average_end=[round(x, 2) for x in os.getloadavg()], finished=time.strftime("%Y-%m-%d %H:%M"))
    Path(args.out or source).write_text(to_json(out) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
