"""What an IterIS merge costs: the sweep, the paper's Jacobi loop and RegMean measured side by side.

    python benchmarks/performance.py                       # every section, writes benchmarks/results/performance.json
    python benchmarks/performance.py --sections smollm2 --jacobi-iters 10
    python benchmarks/results_md.py                        # renders docs/performance.md from the JSON

Sections
  smollm2   SmolLM2-135M-Instruct with the shipped task LoRAs (r = 8 on q, v), 3 tasks x 50 calibration samples
            (the cpu profile): one plain forward pass over the calibration data, RegMean, the sweep and Jacobi;
            merge time, its ratio to RegMean's and to the plain forward passes the merge makes, peak memory,
            distance to the fixed point, and the sweep's cost broken down (forward passes and hooks, statistics,
            solves).
  scaling   random-init Llama configs (2 blocks, LoRAs r = 8 on q, v, 48-token samples): time and peak memory of
            RegMean and the sweep against samples per task, tasks, rank and hidden size (135M- to 1B-shape).
  gpu7b     (CUDA only) a 7B-shaped random Llama in bf16, 4 LoRAs r = 16 on q, v, 50 samples x 256 tokens.

Every measurement runs in a fresh subprocess (peak memory = its peak RSS, or CUDA's allocator peak, above what it
held before merging); ratios are formed from numbers of the same run. Timings on a shared machine are noisy:
read the ratios, and the machine load recorded with them.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("smollm2", "scaling", "gpu7b")


# ----------------------------------------------------------------------------------------------------------------
# One measurement (runs in its own process)

def _release_free_memory() -> None:
    """Hand memory freed by loading back to the OS, so that RSS growth during a merge is the merge's own."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class _Timers:
    """Seconds spent summing the sweep's statistics and in the solves, by wrapping the two functions."""

    def __init__(self):
        from iteris_lab import merge
        from iteris_lab.statistics import Statistics

        self.seconds = {"statistics": 0.0, "solves": 0.0}
        self._patches = [(Statistics, "add", "statistics"), (merge, "_solve_layer", "solves")]

    def __enter__(self):
        self._originals = []
        for module, name, label in self._patches:
            original = getattr(module, name)
            self._originals.append((module, name, original))

            def timed(*args, _original=original, _label=label, **kwargs):
                tick = time.perf_counter()
                try:
                    return _original(*args, **kwargs)
                finally:
                    self.seconds[_label] += time.perf_counter() - tick
            setattr(module, name, timed)
        return self

    def __exit__(self, *exc):
        for module, name, original in self._originals:
            setattr(module, name, original)
        return False


def _smollm2_problem(samples: int):
    from iteris_lab.io.peft import load_adapter
    from iteris_lab.tracks.llm.track import load_track
    from iteris_lab.tracks.llm.tasks import calibration_batches

    track = load_track("smollm2")
    adapters = [load_adapter(track.adapters[t]) for t in track.tasks]
    calibration = [calibration_batches(task, track.tokenizer, n=samples, batch_size=16, max_length=track.max_length)
                   for task in track.tasks.values()]
    return track.model, adapters, calibration


def _random_problem(hidden: int, tasks: int, samples: int, rank: int, tokens: int = 48, layers: int = 2,
                    dtype: str = "float32", heads: int | None = None):
    """A random-init Llama of the given shape and `tasks` random LoRAs on q, v (‖ΔW‖ = 0.1‖W0‖)."""
    import torch
    import transformers

    from iteris_lab.adapters import LoraAdapter, LoraLayer

    heads = heads or max(1, hidden // 64)
    config = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 64 * 64,
                                      num_hidden_layers=layers, num_attention_heads=heads,
                                      num_key_value_heads=max(1, heads // 3) if heads % 3 == 0 else heads,
                                      vocab_size=4096, max_position_embeddings=max(tokens, 64))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        with torch.device(device):
            model = transformers.LlamaForCausalLM(config).to(getattr(torch, dtype)).eval()
        generator = torch.Generator().manual_seed(1)
        adapters = []
        for t in range(tasks):
            layers_ = {}
            for name, module in model.named_modules():
                if name.endswith(("q_proj", "v_proj")):
                    out, inp = module.weight.shape
                    A, B = torch.randn(rank, inp, generator=generator), torch.randn(out, rank, generator=generator)
                    scale = float(0.1 * module.weight.detach().float().norm().cpu() / (B @ A).norm())
                    layers_[name] = LoraLayer(A, B, scale)
            adapters.append(LoraAdapter(f"random-{t}", {"base_model_name_or_path": "random"}, layers_))
        calibration = [[{"input_ids": torch.randint(1, 4096, (min(16, samples - s), tokens), generator=generator),
                         "attention_mask": torch.ones(min(16, samples - s), tokens, dtype=torch.long)}
                        for s in range(0, samples, 16)] for _ in range(tasks)]
    return model, adapters, calibration


def _live_bytes_per_token(model, batch, names) -> float:
    """Bytes one forward pass keeps alive at its worst stop (the input of an adapted module), per real token: every
    tensor the garbage collector can see at that moment that is not a parameter or buffer, on one batch. A paused
    pass of the sweep holds exactly this, so tokens × this × 2 roles is the floor of an exact sweep's memory."""
    import gc

    import torch

    fixed = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    worst = 0

    def hook(module, args):
        nonlocal worst
        live = {}
        for obj in gc.get_objects():
            if isinstance(obj, torch.Tensor) and obj.device.type != "meta":
                storage = obj.untyped_storage()
                if storage.data_ptr() not in fixed:
                    live[storage.data_ptr()] = storage.nbytes()
        worst = max(worst, sum(live.values()))

    handles = [model.get_submodule(name).register_forward_pre_hook(hook) for name in names]
    try:
        with torch.no_grad():
            model(**batch, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return worst / int(batch["attention_mask"].sum())


def _plain_forward_seconds(model, calibration) -> float:
    import torch

    from iteris_lab.plumbing.passes import input_device, to_device

    device = input_device(model)
    _sync()
    tick = time.perf_counter()
    with torch.no_grad():
        for batches in calibration:
            for batch in batches:
                model(**to_device(batch, device), use_cache=False)
    _sync()
    return time.perf_counter() - tick


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure(spec: dict) -> dict:
    """One problem, one or more merges of it; each merge's time, peak memory above the start, and deltas."""
    import torch

    from iteris_lab import merge_loras
    from iteris_lab.measure import PeakMemory

    threads = spec.get("threads")
    if threads:
        torch.set_num_threads(threads)
    if spec["problem"] == "smollm2":
        model, adapters, calibration = _smollm2_problem(spec["samples"])
    else:
        model, adapters, calibration = _random_problem(**spec["problem_args"])
    tokens = sum(int(b["attention_mask"].sum()) for batches in calibration for b in batches)
    out = {"spec": spec, "tokens": tokens, "forward_seconds": _plain_forward_seconds(model, calibration), "merges": {}}
    if spec.get("floor"):  # measured on a copy of the first batch, before any merge
        names = sorted(set().union(*(a.layers for a in adapters)))
        out["live_bytes_per_token"] = _live_bytes_per_token(model, calibration[0][0], names)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reference = torch.load(spec["reference"]) if spec.get("reference") else None
    for label, kwargs in spec["merges"].items():
        per_solve = []
        if reference is not None:  # distance of every Jacobi solve to the fixed point (the sweep's merge)
            kwargs = {**kwargs, "on_iteration": lambda record, deltas: per_solve.append(_distance(deltas, reference))}
        _release_free_memory()
        with _Timers() as timers, PeakMemory(device) as memory:
            _sync()
            result = merge_loras(model, adapters, calibration, progress=False, **kwargs)
            _sync()
        kwargs.pop("on_iteration", None)
        out["merges"][label] = {"kwargs": kwargs, "seconds": result.seconds, "peak_memory_mb": memory.peak_mb,
                                "statistics_seconds": timers.seconds["statistics"],
                                "solve_seconds": timers.seconds["solves"], "solves": len(result.history),
                                "distance_per_solve": per_solve}
        if spec.get("save_deltas"):
            torch.save(result.deltas, spec["save_deltas"].format(label=label))
    return out


# ----------------------------------------------------------------------------------------------------------------
# The sections (the parent process)

def _run(spec: dict) -> dict:
    """measure(spec) in a fresh Python process."""
    command = [sys.executable, __file__, "--measure", json.dumps(spec)]
    env = {**os.environ, "TQDM_DISABLE": "1", **spec.get("env", {})}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"measurement failed: {spec}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _distance(a: dict, b: dict) -> float:
    return max(float((a[n].float() - b[n].float()).norm() / b[n].float().norm()) for n in b)


def smollm2_section(jacobi_iters: int, samples: int, workdir: Path) -> dict:
    """The sweep, RegMean and (jacobi_iters > 0) Jacobi on SmolLM2, each merge in its own process."""
    merges = {"sweep": dict(schedule="sweep"), "regmean": dict(method="regmean")}
    if jacobi_iters:
        merges[f"jacobi_{jacobi_iters}"] = dict(schedule="jacobi", max_iter=jacobi_iters)
    rows = {}
    for label, kwargs in merges.items():
        path = str(workdir / f"smollm2_{{label}}.pt")
        spec = {"problem": "smollm2", "samples": samples, "merges": {label: kwargs}, "threads": 1, "save_deltas": path}
        if label.startswith("jacobi"):
            spec["reference"] = str(workdir / "smollm2_sweep.pt")
        rows[label] = _run(spec)
    return smollm2_table(rows, samples, workdir)


def smollm2_table(rows: dict, samples: int, workdir: Path) -> dict:
    """The section's table from measure()'s output per label (deltas saved in workdir as smollm2_<label>.pt)."""
    import torch

    reference = torch.load(workdir / "smollm2_sweep.pt")
    table = []
    regmean_seconds = rows["regmean"]["merges"]["regmean"]["seconds"]
    regmean_memory = rows["regmean"]["merges"]["regmean"]["peak_memory_mb"]
    for label, row in rows.items():
        merge = row["merges"][label]
        passes = {"regmean": 1, "sweep": 2}.get(label) or 2 * int(label.split("_")[1]) - 1
        deltas = torch.load(workdir / f"smollm2_{label}.pt")
        seconds = merge["seconds"]
        table.append({
            "label": label, "seconds": seconds, "peak_memory_mb": merge["peak_memory_mb"],
            "forward_passes": passes, "plain_forward_seconds": row["forward_seconds"],
            "time_over_its_forward_passes": seconds / (passes * row["forward_seconds"]),
            "time_over_regmean": seconds / regmean_seconds, "memory_over_regmean": merge["peak_memory_mb"] / regmean_memory,
            "distance_to_fixed_point": _distance(deltas, reference) if label != "sweep" else 0.0,
            "statistics_seconds": merge["statistics_seconds"], "solve_seconds": merge["solve_seconds"],
            "forward_and_hooks_seconds": seconds - merge["statistics_seconds"] - merge["solve_seconds"],
            "distance_per_solve": merge["distance_per_solve"],
        })
    return {"tokens": rows["sweep"]["tokens"], "samples_per_task": samples, "tasks": 3,
            "plain_forward_seconds": rows["sweep"]["forward_seconds"], "rows": table}


SCALING = {
    "samples": [dict(samples=s) for s in (50, 150, 500)],
    "tasks": [dict(tasks=t) for t in (2, 4, 8)],
    "rank": [dict(rank=r) for r in (4, 16, 64)],
    "hidden": [dict(hidden=h) for h in (576, 960, 2048)],  # SmolLM2-135M, -360M and Llama-3.2-1B widths
}
SCALING_BASE = dict(hidden=576, tasks=3, samples=50, rank=8)
# The same base point under other allocator settings: what of the sweep's resident size is retained buffers
# (MKL's per-thread GEMM buffers, glibc keeping freed blocks) rather than live tensors.
ALLOCATOR = {"default": {}, "MKL_DISABLE_FAST_MM=1": {"MKL_DISABLE_FAST_MM": "1"},
             "+ MALLOC_MMAP_THRESHOLD_=1048576": {"MKL_DISABLE_FAST_MM": "1", "MALLOC_MMAP_THRESHOLD_": "1048576"}}


def scaling_section(axes=tuple(SCALING) + ("allocator",)) -> dict:
    out = {}
    for axis in (a for a in SCALING if a in axes):
        out[axis] = []
        for point in SCALING[axis]:
            args = {**SCALING_BASE, **point}
            row = {"value": point[axis]}
            for label, kwargs in (("regmean", dict(method="regmean")), ("sweep", dict(schedule="sweep"))):
                measured = _run({"problem": "random", "problem_args": args, "merges": {label: kwargs}, "threads": 1,
                                 "floor": label == "sweep"})
                merge = measured["merges"][label]
                row[label] = {"seconds": merge["seconds"], "peak_memory_mb": merge["peak_memory_mb"],
                              "forward_seconds": measured["forward_seconds"], "tokens": measured["tokens"]}
                if label == "sweep":  # every token's live activations at the worst stop, in both roles
                    row["floor_mb"] = 2 * measured["tokens"] * measured["live_bytes_per_token"] / 2**20
                    row["live_bytes_per_token"] = measured["live_bytes_per_token"]
            row["time_ratio"] = row["sweep"]["seconds"] / row["regmean"]["seconds"]
            row["memory_ratio"] = row["sweep"]["peak_memory_mb"] / max(row["regmean"]["peak_memory_mb"], 1e-9)
            row["memory_over_floor"] = row["sweep"]["peak_memory_mb"] / row["floor_mb"]
            out[axis].append(row)
    if "allocator" not in axes:
        return out
    out["allocator"] = []
    for name, env in ALLOCATOR.items():
        row = {"value": name}
        for label, kwargs in (("regmean", dict(method="regmean")), ("sweep", dict(schedule="sweep"))):
            measured = _run({"problem": "random", "problem_args": SCALING_BASE, "merges": {label: kwargs},
                             "threads": 1, "env": env})
            merge = measured["merges"][label]
            row[label] = {"seconds": merge["seconds"], "peak_memory_mb": merge["peak_memory_mb"],
                          "forward_seconds": measured["forward_seconds"], "tokens": measured["tokens"]}
        row["time_ratio"] = row["sweep"]["seconds"] / row["regmean"]["seconds"]
        row["memory_ratio"] = row["sweep"]["peak_memory_mb"] / max(row["regmean"]["peak_memory_mb"], 1e-9)
        out["allocator"].append(row)
    return out


def gpu7b_section(jacobi_iters: int) -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    args = dict(hidden=4096, tasks=4, samples=50, rank=16, tokens=256, layers=32, dtype="bfloat16", heads=32)
    rows = {}
    for label, kwargs in (("sweep", dict(schedule="sweep")), ("regmean", dict(method="regmean")),
                          (f"jacobi_{jacobi_iters}", dict(schedule="jacobi", max_iter=jacobi_iters))):
        measured = _run({"problem": "random", "problem_args": args, "merges": {label: kwargs}})
        rows[label] = {**measured["merges"][label], "forward_seconds": measured["forward_seconds"]}
    return {"problem": args, "device": torch.cuda.get_device_name(0), "rows": rows}


def environment() -> dict:
    from iteris_lab.tracks.environment import environment as probe

    return probe(("python", "torch", "cpu_count", "machine", "processor", "load_average_at_start", "commit", "device",
                  "date"), root=ROOT)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {SECTIONS}")
    parser.add_argument("--jacobi-iters", type=int, default=10, help="Jacobi solves to compare (default 10; 0: no Jacobi row)")
    parser.add_argument("--samples", type=int, default=50, help="SmolLM2 calibration samples per task")
    parser.add_argument("--axes", default=",".join((*SCALING, "allocator")),
                        help="scaling axes to measure, comma-separated (default: all)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "performance.json"))
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(json.loads(args.measure))))
        return 0
    import tempfile

    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section {unknown[0]!r}; choose from {SECTIONS}")
    out_path = Path(args.out)
    out = json.loads(out_path.read_text()) if out_path.is_file() else {}
    out["environment"] = environment()
    with tempfile.TemporaryDirectory() as work:
        for section in sections:
            tick = time.perf_counter()
            if section == "smollm2":
                out[section] = smollm2_section(args.jacobi_iters, args.samples, Path(work))
            elif section == "scaling":
                out[section] = scaling_section(tuple(a.strip() for a in args.axes.split(",")))
            else:
                out[section] = gpu7b_section(args.jacobi_iters)
            out[section]["section_seconds"] = time.perf_counter() - tick
            out[section]["environment"] = out["environment"]
            out[section]["load_average_at_end"] = os.getloadavg()
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out_path.write_text(json.dumps(out, indent=2))
            print(f"{section}: done in {time.perf_counter() - tick:.0f} s -> {out_path}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
