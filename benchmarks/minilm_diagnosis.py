"""Why IterIS and RegMean tie on the MiniLM track: how far the merged model's layer inputs drift from each task's
(‖X_i − X̃_i‖² / ‖X_i‖²), and the layer objective of the first solve (X̃ = X, RegMean-like) against the fixed point,
both measured on the merged models themselves. Writes benchmarks/results/minilm_diagnosis.json."""
from __future__ import annotations

import json
from pathlib import Path

import iteris_lab
from iteris_lab.profiles import current_profile
from iteris_lab.tracks.llm.track import load_track
from iteris_lab.tracks.llm.tasks import calibration_batches

ROOT = Path(__file__).resolve().parent.parent


def mean(values):
    values = list(values)
    return sum(values) / len(values)


def main() -> int:
    profile = current_profile()
    track = load_track("minilm")
    chosen = json.loads((ROOT / "benchmarks/results/minilm.json").read_text())["iteris_chosen"]
    calibration = [calibration_batches(t, track.tokenizer, n=profile.calibration_samples, batch_size=profile.batch_size,
                                       max_length=track.max_length) for t in track.tasks.values()]
    result = iteris_lab.merge_loras(track.model, list(track.adapters.values()), calibration,
                                    schedule="jacobi", max_iter=profile.max_iter, progress=False, **chosen)
    history = result.history
    layers = list(result.deltas)
    out = {
        "settings": {**chosen, "max_iter": profile.max_iter, "samples": profile.calibration_samples},
        # the objective each solution really has: measured on the inputs of the merged model it produced
        "merged_objective_by_solution": [mean(mean(v) for v in r.merged_objective.values()) for r in history[1:]],
        "drift_last_layer_by_iteration": [mean(r.drift[layers[-1]]) for r in history],
        "drift_by_layer_at_end": {name: mean(history[-1].drift[name]) for name in layers},
        "max_change_by_iteration": [max(r.change.values()) for r in history],
    }
    first = iteris_lab.merge_loras(track.model, list(track.adapters.values()), calibration, schedule="jacobi",
                                   max_iter=1,
                                   progress=False, **chosen)
    diff = [float((result.deltas[n] - first.deltas[n]).norm() / result.deltas[n].norm()) for n in layers]
    out["relative_norm_change_first_to_last"] = {"mean": mean(diff), "max": max(diff)}
    path = ROOT / "benchmarks/results/minilm_diagnosis.json"
    path.write_text(json.dumps(out, indent=2))
    print(json.dumps({k: v for k, v in out.items() if k != "drift_by_layer_at_end"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
