"""Render docs/performance.md (and docs/performance.png) from benchmarks/results/performance.json.

    python benchmarks/performance.py && python benchmarks/performance_md.py
Every number on the page comes from the JSON; the prose says what the numbers are, not what they should be.
"""
from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "performance.json"
PAGE = ROOT / "docs" / "performance.md"
PLOT = ROOT / "docs" / "performance.png"

INTRO = """# What a merge costs

IterIS solves every adapted layer from the statistics `X_iᵀX̃_i` and `X̃_iᵀX̃_i`, where `X̃_i` are the inputs the
*merged* model gives the layer. The paper's loop (`schedule="jacobi"`) re-runs the calibration data through each
new merge, so `max_iter` solves cost `2·max_iter − 1` forward passes per batch and converge after as many solves
as the chain of adapted layers is deep. The sweep (`schedule="sweep"`, [iteris_lab/sweep.py](../iteris_lab/sweep.py))
runs each batch twice side by side — with its task's LoRA and through the merged model — stops both at every
adapted layer, and solves the layer once all batches have reached it: every layer upstream is already final, so
the solve is the fixed point, and the merge costs two forward passes per batch. RegMean (`method="regmean"`) makes
one.

What each holds in memory:
- RegMean and Jacobi: the statistics of every adapted layer for every task (Jacobi three: `S = XᵀX`, `P = XᵀX̃`,
  `Q = X̃ᵀX̃`), `in × in` floats each, plus the activations of one batch (Jacobi: one batch in both roles, side by
  side).
- the sweep: the statistics of one layer at a time, plus the live activations of every calibration batch at the
  current depth, twice (task pass and merged pass); the passes end at the last adapted layer, so no batch's LM head
  runs (its logits, batch × tokens × vocabulary floats, were the sweep's peak before; RegMean and Jacobi still
  compute them, one batch at a time) — the same trade GPTQ-style layer-wise calibrators make when
  they cache every sample's block inputs. It grows with the number of calibration tokens, not with depth. The
  passes are greenlets ([iteris_lab/plumbing/passes.py](../iteris_lab/plumbing/passes.py)): coroutines in the caller's thread, so a
  paused pass holds its activations and nothing per thread. The *floor* column of the scaling table is what an exact
  sweep must hold: the bytes one pass keeps alive at its worst stop (every tensor the garbage collector sees there
  that is not a parameter, measured per token on one batch) × the calibration tokens × 2 roles.

Targets (issue 21): the sweep's time at most 2.2× RegMean's; its peak memory at most 1.5× RegMean's on SmolLM2
(3 tasks × 50 samples), and at 500 samples per task on the scaling table's random 2-block Llama at most its floor
plus 20 %. Where memory binds, use fewer calibration samples (the paper's 20–60 per task are enough, see
results.md) or `schedule="jacobi"`, whose memory does not grow with samples.

Every number below is measured by [benchmarks/performance.py](../benchmarks/performance.py), each merge in its own
process (peak memory = the growth of the resident set during the merge, sampled every 20 ms, or CUDA's allocator
peak). The machine is shared: read the ratios, taken in one run, with the load averages recorded beside them.
"""


def _env(env: dict) -> str:
    load = ", ".join(f"{x:.1f}" for x in env["load_average_at_start"])
    return (f"Measured {env['date']} at commit `{env['commit']}` on {env['device']} ({env['cpu_count']} cores, "
            f"{env['machine']}), torch {env['torch']}, Python {env['python']}; load average at start {load}.")


def _section_env(section: dict) -> list[str]:
    """When and where the section was measured, and its note (e.g. what changed since) when it has one."""
    lines = [_env(section["environment"]), ""] if "environment" in section else []
    return lines + ([f"**Note:** {section['note']}", ""] if section.get("note") else [])


def smollm2(section: dict) -> list[str]:
    rows = section["rows"]
    by = {r["label"]: r for r in rows}
    load = ", ".join(f"{x:.1f}" for x in section["load_average_at_end"])
    lines = ["## SmolLM2-135M-Instruct, shipped LoRAs (r = 8 on q, v; 30 blocks)", "", *_section_env(section),
             f"{section['tasks']} tasks × {section['samples_per_task']} calibration samples "
             f"({section['tokens']} real tokens), one thread. One plain forward pass over all calibration data: "
             f"{section['plain_forward_seconds']:.1f} s. Load average when the section ended: {load}.", "",
             "| merge | seconds | ÷ RegMean | forward passes per batch | ÷ its plain forward passes | peak MB | "
             "÷ RegMean | distance to the fixed point |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['seconds']:.1f} | {r['time_over_regmean']:.2f} | {r['forward_passes']} | "
                     f"{r['time_over_its_forward_passes']:.2f} | {r['peak_memory_mb']:.0f} | "
                     f"{r['memory_over_regmean']:.2f} | {r['distance_to_fixed_point']:.1e} |")
    lines += ["", "Distance to the fixed point: max over layers of ‖ΔW − ΔW_sweep‖_F / ‖ΔW_sweep‖_F (RegMean is the "
              "first solve with λ = 1, α = 0 and its off-diagonal shrink, so it is not expected to be 0).", ""]
    for r in rows:
        if r.get("distance_per_solve"):
            steps = ", ".join(f"{d:.1e}" for d in r["distance_per_solve"])
            lines += [f"{r['label']}, distance to the fixed point after each solve: {steps}.", ""]
    lines += [
              "Where the sweep's time goes:", "", "| part | seconds | share |", "|---|---|---|"]
    sweep = by["sweep"]
    parts = [("forward passes, hooks and switching passes", sweep["forward_and_hooks_seconds"]),
             ("summing the statistics (S, P, Q)", sweep["statistics_seconds"]),
             ("solves, λ and objective records", sweep["solve_seconds"])]
    lines += [f"| {name} | {seconds:.1f} | {seconds / sweep['seconds']:.0%} |" for name, seconds in parts]
    return lines + [""]


def scaling(section: dict) -> list[str]:
    names = {"samples": "samples per task", "tasks": "tasks", "rank": "LoRA rank", "hidden": "hidden size",
             "allocator": "allocator (base point)"}
    lines = ["## Scaling (random-init Llama, 2 blocks, LoRAs on q, v; base point: hidden 576, 3 tasks, "
             "50 samples × 48 tokens, r = 8)", "",
             *_section_env(section),
             "| axis | value | RegMean s | sweep s | time ÷ RegMean | RegMean MB | sweep MB | memory ÷ RegMean | "
             "sweep floor MB | sweep ÷ floor |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for axis in names:
        for p in section.get(axis, []):
            floor = (f"{p['floor_mb']:.0f} | {p['memory_over_floor']:.2f}" if "floor_mb" in p else "– | –")
            lines.append(f"| {names[axis]} | {p['value']} | {p['regmean']['seconds']:.2f} | {p['sweep']['seconds']:.2f} | "
                         f"{p['time_ratio']:.2f} | {p['regmean']['peak_memory_mb']:.0f} | "
                         f"{p['sweep']['peak_memory_mb']:.0f} | {p['memory_ratio']:.2f} | {floor} |")
    per_token = [p["live_bytes_per_token"] for axis in names for p in section.get(axis, []) if "live_bytes_per_token" in p]
    if per_token:
        lines += ["", f"The floor: one pass keeps {per_token[0]:.0f} bytes per token alive at its worst stop at the base "
                  "point (v_proj of block 1: the embedding output, the block's residual input, its normed input, "
                  "q_proj's and k_proj's outputs), in float32; times the tokens and 2 roles."]
    lines += _block_inputs(section)
    missing = [names[a] for a in ("samples", "tasks", "rank", "hidden", "allocator") if a not in section]
    if missing:
        lines += ["", f"Not re-measured in this run: {', '.join(missing)}."]
    return lines + ["", f"![scaling]({PLOT.name})", ""]


def _block_inputs(section: dict) -> list[str]:
    """What a GPTQ-style schedule would hold instead of the floor: computed from the JSON, not measured."""
    point = next((p for p in section.get("samples", []) if p["value"] == 500 and "floor_mb" in p), None)
    if point is None:
        return []
    from performance import SCALING_BASE  # benchmarks/performance.py, beside this script

    hidden = SCALING_BASE["hidden"]  # the width of a block's input at the samples axis
    block_mb = 2 * point["sweep"]["tokens"] * hidden * 4 / 2**20
    return ["", f"A GPTQ-style schedule — run the model block by block, keeping only every token's input to the next "
            f"block (hidden-wide, float32) in both roles — would hold {block_mb:.0f} MB at 500 samples per task "
            f"against the floor's {point['floor_mb']:.0f} MB (computed from the same token count; not built, not "
            "measured). It stays exact: within a block the sweep's order applies, each group of modules solved "
            "from the block re-run with the groups before it final. It is not general: it needs the model as a "
            "list of blocks and each block's call signature (attention masks, rotary position embeddings, caches), "
            "and a diffusion UNet's skip connections or an encoder–decoder's cross-attention make the state between "
            "blocks more than one tensor — which is why the library's sweep pauses whole forward passes instead, "
            "for any model and forward function. Where the floor binds, fewer calibration samples or "
            "`schedule=\"jacobi\"` are the remedies the library offers."]


def plot(section: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    axes_names = [a for a in ("samples", "tasks", "rank", "hidden") if a in section]
    fig, axes = plt.subplots(2, len(axes_names), figsize=(4 * len(axes_names), 6.5), squeeze=False)
    for k, axis in enumerate(axes_names):
        points = section[axis]
        values = [p["value"] for p in points]
        for row, (key, label) in enumerate((("seconds", "merge time (s)"), ("peak_memory_mb", "peak memory (MB)"))):
            ax = axes[row][k]
            for method, marker in (("regmean", "o"), ("sweep", "s")):
                ax.plot(values, [p[method][key] for p in points], marker=marker, label=method)
            ax.set_xlabel(axis)
            ax.set_ylabel(label)
            ax.set_xscale("log")
            ax.set_xticks(values, [str(v) for v in values])
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.grid(alpha=0.3)
    axes[0][0].legend(loc="upper left")
    fig.suptitle("RegMean and the IterIS sweep against problem size (random-init Llama, CPU, one thread)")
    fig.tight_layout()
    fig.savefig(PLOT, dpi=110)


def gpu(section: dict) -> list[str]:
    if "rows" not in section:
        return ["## GPU: 7B-shaped Llama in bf16", "", f"Not measured: {section.get('skipped', 'no data')}. Run "
                "`python benchmarks/performance.py --sections gpu7b` on a CUDA machine.", ""]
    problem = section["problem"]
    lines = [f"## GPU ({section['device']}): 7B-shaped random Llama in bf16", "",
             f"hidden {problem['hidden']}, {problem['layers']} blocks, {problem['tasks']} LoRAs r = {problem['rank']} on "
             f"q, v, {problem['samples']} samples × {problem['tokens']} tokens per task.", "",
             "| merge | seconds | peak GB (CUDA allocator) |", "|---|---|---|"]
    lines += [f"| {label} | {r['seconds']:.1f} | {r['peak_memory_mb'] / 1024:.2f} |" for label, r in section["rows"].items()]
    return lines + [""]


def main() -> int:
    out = json.loads(RESULTS.read_text())
    lines = [INTRO]
    if "smollm2" in out:
        lines += smollm2(out["smollm2"])
    if "scaling" in out:
        lines += scaling(out["scaling"])
        plot(out["scaling"])
    lines += gpu(out.get("gpu7b", {}))
    PAGE.write_text("\n".join(lines))
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
