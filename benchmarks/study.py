"""Chapter 06's study, precomputed: accuracy against calibration samples, α, solves, λ variant and task count.

    OMP_NUM_THREADS=1 python benchmarks/study.py --part minilm   # samples, α, solves, λ on all-MiniLM-L6-v2
    OMP_NUM_THREADS=1 python benchmarks/study.py --part tasks    # 2 -> 6 merged SmolLM2 tasks
    OMP_NUM_THREADS=1 python benchmarks/study.py --part tasks_order2   # the same, tasks added in another order
    OMP_NUM_THREADS=1 python benchmarks/study.py --part live     # the ci-sized point chapter 06 recomputes
    OMP_NUM_THREADS=1 python benchmarks/study.py --part paired   # MiniLM rows with per-example outcomes (intervals)
    OMP_NUM_THREADS=1 python benchmarks/study.py --part tasks_paired  # all six SmolLM2 tasks merged, with outcomes
Each part updates its own key of benchmarks/results/study.json (with its sizes, seeds, times and load average);
the functions are in iteris_lab/tracks/llm/study.py. Then `python benchmarks/results_md.py` re-renders the table.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from iteris_lab.profiles import PROFILES
from iteris_lab.io.peft import load_adapter
from iteris_lab.measure import weights_added
from iteris_lab.tracks.environment import environment as harness_environment
from iteris_lab.tracks.harness import score_row, split_outcomes, to_json
from iteris_lab.tracks.llm import study

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "study.json"

# The cpu-profile size of this study (chosen to fit ~45 min on one core).
MINILM = {"limit": 150, "samples": (5, 10, 20, 50, 100, 200, 500), "seeds": (0, 1, 2), "seeds_up_to": 20,
          "alpha_grid": (0.0, 1e-6, 1e-4, 1e-2, 1.0), "alpha_samples": (10, 50), "samples_default": 50,
          "max_iter": 7, "weights": ("official", "paper", "none")}
# SmolLM2: the three benchmark tasks, then the three tasks made for this study, in this order. Sized to the shared
# CPU (load ~10 on 2 cores): a first run with TIES, 40 test examples and 20 samples per task needed 10 min for k = 2
# alone, so TIES was left out and the subsets cut to 30 test examples and 16 calibration samples per task.
TASK_ORDER = ("addition", "sentiment", "topic", "subtraction", "larger", "parity")
# A second order (each new task early, a benchmark task last) gives other subsets for k = 2..5 and the same six at k = 6.
TASK_ORDER_2 = ("subtraction", "sentiment", "larger", "topic", "parity", "addition")
SMOLLM2 = {"limit": 30, "samples": 16, "methods": ("linear", "task_arithmetic", "regmean", "iteris_sweep")}
# Chapter 06's comparisons, re-measured with every example's outcome stored so that each one gets a paired interval:
# the same test examples and seeded draws as part "minilm" (its rows must come out equal), the sample sizes its
# claims rest on, α = 1e-4 next to the validated 1e-2, the λ variants and the data-free merges on these examples.
PAIRED = {"limit": MINILM["limit"], "samples": (10, 20, 50, 500), "seeds": (0, 1, 2), "seeds_up_to": 20,
          "alpha_samples": 50, "alpha": 1e-4, "weights": ("official", "paper"), "data_free": ("linear",
          "task_arithmetic", "ties")}
# What chapter 06 recomputes live: ITERIS_PROFILE=ci's sizes on MiniLM.
LIVE = {"samples": PROFILES["ci"].calibration_samples, "limit": PROFILES["ci"].test_limit, "seed": 0}


def chosen(model: str) -> dict:
    """The IterIS settings the track's benchmark chose on validation (benchmarks/results/<model>.json)."""
    return json.loads((ROOT / "benchmarks" / "results" / f"{model}.json").read_text())["iteris_chosen"]


def spec(label: str, iteris: dict, samples: int) -> dict:
    specs = {"linear": dict(method="linear"), "task_arithmetic": dict(method="task_arithmetic"),
             "ties": dict(method="ties"), "regmean": dict(method="regmean", samples=samples),
             "iteris_sweep": dict(method="iteris", schedule="sweep", samples=samples, **iteris)}
    return specs[label]


def environment() -> dict:
    # torch_threads is written next to it (main), so not repeated inside
    return harness_environment(("python", "torch", "transformers", "peft", "cpu_count", "device"))


def log(*args) -> None:
    print(time.strftime("%H:%M:%S"), *args, flush=True)


def sample_rows(track, own, limit, cfg: dict, iteris: dict) -> list[dict]:
    """RegMean and the IterIS sweep at every calibration size of cfg["samples"] (several seeded draws up to
    cfg["seeds_up_to"] samples, one above)."""
    rows = []
    for n in cfg["samples"]:
        for seed in (cfg["seeds"] if n <= cfg["seeds_up_to"] else cfg["seeds"][:1]):
            rows.append({"label": "regmean", **study.merge_row(track, "regmean", own, limit, samples=n, seed=seed)})
            rows.append({"label": "iteris_sweep", **study.merge_row(track, "iteris", own, limit, samples=n, seed=seed,
                                                                     schedule="sweep", **iteris)})
            log("samples", n, seed, rows[-2]["mean_normalized"], rows[-1]["mean_normalized"])
    return rows


def part_minilm() -> dict:
    cfg, iteris = MINILM, chosen("minilm")
    track = study.study_track("minilm")
    limit = cfg["limit"]
    own = study.own_accuracy(track, limit)
    log("own", own)
    out = {"model": "minilm", "tasks": list(track.tasks), "own": own, "iteris_settings": iteris, "config": cfg}

    out["samples"] = sample_rows(track, own, limit, cfg, iteris)

    rows = []
    for n in cfg["alpha_samples"]:
        for alpha in cfg["alpha_grid"]:
            try:
                row = study.merge_row(track, "iteris", own, limit, samples=n, schedule="sweep", alpha=alpha,
                                      adaptive_weights=iteris["adaptive_weights"])
            except Exception as error:  # α = 0 with fewer tokens than inputs: a singular Gram, recorded as such
                row = {"method": "iteris", "samples": n, "alpha": alpha, "error": f"{type(error).__name__}: {error}"}
            rows.append(row)
            log("alpha", n, alpha, row.get("mean_normalized"), row.get("error", "")[:80])
    out["alpha"] = rows

    out["solves"] = study.solves_rows(track, own, limit, cfg["samples_default"], cfg["max_iter"], **iteris)
    log("solves", [(r["solve"], round(r["distance_to_fixed_point"], 5)) for r in out["solves"]["per_solve"]])

    rows = []
    for weights in cfg["weights"]:
        for n in cfg["alpha_samples"]:
            rows.append(study.merge_row(track, "iteris", own, limit, samples=n, schedule="sweep",
                                        alpha=iteris["alpha"], adaptive_weights=weights))
            log("weights", weights, n, rows[-1]["mean_normalized"])
    out["weights"] = rows
    reference = {r["label"]: r for r in json.loads((ROOT / "benchmarks/results/minilm.json").read_text())["results"]}
    out["data_free"] = {k: reference[k]["mean_normalized"] for k in ("linear", "task_arithmetic", "ties")}
    return out


def part_tasks(order=TASK_ORDER) -> dict:
    cfg, iteris = SMOLLM2, chosen("smollm2")
    track = study.study_track("smollm2", order)
    limit, samples = cfg["limit"], cfg["samples"]
    own, base, rows = {}, {}, []
    for names in study.nested_subsets(order):
        added = study.subset(track, [t for t in names if t not in own])  # references measured as tasks join
        own.update(study.own_accuracy(added, limit))
        base.update(split_outcomes(added.evaluate("test", limit))[0])
        log("own", own, "base", base)
        sub = study.subset(track, names)
        for label in cfg["methods"]:
            s = dict(spec(label, iteris, samples))
            method = s.pop("method")
            row = study.merge_row(sub, method, {t: own[t] for t in names}, limit, **s)
            rows.append({"label": label, "k": len(names), **row})
            log("tasks", len(names), label, round(row["mean_normalized"], 4), row["merge_seconds"])
    return {"model": "smollm2", "order": list(order), "own": own, "base": base, "iteris_settings": iteris,
            "config": cfg, "rows": rows}


def part_paired() -> dict:
    cfg, iteris = PAIRED, chosen("minilm")
    track = study.study_track("minilm")
    limit = cfg["limit"]
    measured = {}
    for task, path in track.adapters.items():  # each LoRA on every task: the references, with outcomes
        with weights_added(track.model, load_adapter(path).layers):
            measured[task] = split_outcomes(track.evaluate("test", limit))
    own = {task: accuracy[task] for task, (accuracy, _) in measured.items()}
    lora_rows = [{**score_row(f"lora:{task}", "lora", accuracy, own), "per_example": outcomes}
                 for task, (accuracy, outcomes) in measured.items()]
    log("own", own)
    rows = []
    for label in cfg["data_free"]:
        rows.append({"label": label, **study.merge_row(track, label, own, limit)})
        log(label, rows[-1]["mean_normalized"])
    rows += sample_rows(track, own, limit, cfg, iteris)
    n = cfg["alpha_samples"]
    rows.append({"label": "iteris_sweep", **study.merge_row(track, "iteris", own, limit, samples=n, schedule="sweep",
                                                             alpha=cfg["alpha"],
                                                             adaptive_weights=iteris["adaptive_weights"])})
    log("alpha", cfg["alpha"], rows[-1]["mean_normalized"])
    for weights in cfg["weights"]:
        rows.append({"label": "iteris_sweep", **study.merge_row(track, "iteris", own, limit, samples=n,
                                                                 schedule="sweep", alpha=iteris["alpha"],
                                                                 adaptive_weights=weights)})
        log("weights", weights, rows[-1]["mean_normalized"])
    return {"model": "minilm", "tasks": list(track.tasks), "own": own, "iteris_settings": iteris, "config": cfg,
            "loras": lora_rows, "rows": rows}


def part_tasks_paired() -> dict:
    """The k = 6 merges of part "tasks" again (the same in both orders), with per-example outcomes; normalized by
    the own-LoRA accuracies that part measured on the same examples."""
    cfg, iteris = SMOLLM2, chosen("smollm2")
    stored = json.loads(OUT.read_text())["tasks"]
    track = study.study_track("smollm2", TASK_ORDER)
    own, rows = stored["own"], []
    for label in cfg["methods"]:
        s = dict(spec(label, iteris, cfg["samples"]))
        method = s.pop("method")
        rows.append({"label": label, "k": len(TASK_ORDER), **study.merge_row(track, method, own, cfg["limit"], **s)})
        log("tasks_paired", label, round(rows[-1]["mean_normalized"], 4), rows[-1]["merge_seconds"])
    return {"model": "smollm2", "order": list(TASK_ORDER), "own": own, "iteris_settings": iteris, "config": cfg,
            "rows": rows}


def part_live() -> dict:
    track = study.study_track("minilm")
    own = study.own_accuracy(track, LIVE["limit"])
    rows = [study.merge_row(track, "regmean", own, LIVE["limit"], samples=LIVE["samples"], seed=LIVE["seed"]),
            study.merge_row(track, "iteris", own, LIVE["limit"], samples=LIVE["samples"], seed=LIVE["seed"],
                            schedule="sweep", **chosen("minilm"))]
    return {"model": "minilm", "config": LIVE, "own": own, "rows": rows}


PARTS = {"minilm": part_minilm, "tasks": part_tasks, "tasks_order2": lambda: part_tasks(TASK_ORDER_2),
         "live": part_live, "paired": part_paired, "tasks_paired": part_tasks_paired}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=sorted(PARTS), action="append", required=True)
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    for part in args.part:
        start, load = time.perf_counter(), os.getloadavg()
        result = PARTS[part]()
        result.update(seconds=round(time.perf_counter() - start, 1), load_average_start=[round(x, 2) for x in load],
                      load_average_end=[round(x, 2) for x in os.getloadavg()], environment=environment(),
                      torch_threads=torch.get_num_threads(), finished=time.strftime("%Y-%m-%d %H:%M"))
        path = Path(args.out)
        data = json.loads(path.read_text()) if path.is_file() else {}
        data[part] = result
        path.write_text(to_json(data) + "\n")
        log(part, "done in", result["seconds"], "s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
