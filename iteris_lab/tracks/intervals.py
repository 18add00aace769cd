"""95 % intervals on the result table of the accuracy tracks (`iteris-lab demo`, `iteris-lab bench`).

From the per-example outcomes every harness row keeps (harness module docstring), each row gets
    its mean normalized accuracy with a bootstrap interval        harness.mean_interval(row, metric, own_scale)
    its paired difference from the reference row (IterIS)         harness.paired_mean(row, reference, ...)
stored in the row as row["intervals"] (so the JSON carries them), and the table shows them worded by the verdict:
"ahead" / "behind" when the interval excludes 0, else "within noise".

Why IterIS is the reference: the question the demo answers is what IterIS's calibration data buys over each other
method, and the docs table (benchmarks/results_md.py) and the figure (llm.track.score_plot) pair against it too. A
"best data-free" reference would be picked by the very test scores the interval is computed on.

The printed results are two markdown tables, each within 100 columns for the shipped tasks (three task columns
and the intervals do not fit in one): accuracy per task with the merge's cost, then the calibration samples with
the intervals.
"""
from __future__ import annotations

from dataclasses import asdict, fields

from ..measure import PairedDifference

from .harness import PER_EXAMPLE, markdown_table, mean_interval, own_scale, paired_mean, run_columns, task_columns

REFERENCE = "iteris"
CONFIDENCE = 0.95
INTERVALS = "intervals"
MISSING = "—"  # a row without per-example outcomes (a JSON written before they were stored)


def with_intervals(rows: list[dict], metric: str = "correct", reference: str = REFERENCE,
                   confidence: float = CONFIDENCE) -> list[dict]:
    """The rows, each one with per-example `metric` given row["intervals"] = {"confidence", "mean_normalized":
    {mean, low, high, n}, and when the reference row has outcomes "reference": its label, "vs": {mean, low, high,
    n, p_value, verdict} (row − reference, paired; not on the reference row itself)}. Normalized by each task's own
    LoRA (the "lora:<task>" rows, harness.own_scale); without those rows the rows come back as they were, and so
    does every row without outcomes. The input is not modified."""
    scale = own_scale(rows)
    if not scale:
        return list(rows)
    ref = next((r for r in rows if r["label"] == reference and PER_EXAMPLE in r), None)
    out = []
    for row in rows:
        if PER_EXAMPLE not in row:
            out.append(row)
            continue
        own = mean_interval(row, metric, scale, confidence=confidence)
        intervals = {"confidence": confidence,
                     "mean_normalized": {k: v for k, v in asdict(own).items() if k in ("mean", "low", "high", "n")}}
        if ref is not None:
            intervals["reference"] = reference
        if ref is not None and row is not ref:
            diff = paired_mean(row, ref, metric, scale, confidence=confidence)
            intervals["vs"] = {**asdict(diff), "verdict": diff.verdict}
        out.append({**row, INTERVALS: intervals})
    return out


def mean_cell(row: dict) -> str:
    """"0.976 [0.96, 0.99]": the mean and its interval (two decimals: the width is about ±0.02 on the shipped
    test sets, and three would overflow 100 columns)."""
    d = row.get(INTERVALS, {}).get("mean_normalized")
    return MISSING if d is None else f"{d['mean']:.3f} [{d['low']:.2f}, {d['high']:.2f}]"


def vs_cell(row: dict) -> str:
    """"+0.002 [-0.004, +0.008] within noise": row − reference, its paired interval and the verdict."""
    stored = row.get(INTERVALS, {})
    d = stored.get("vs")
    if d is None:
        return "reference" if stored.get("reference") == row["label"] else MISSING
    return PairedDifference(**{f.name: d[f.name] for f in fields(PairedDifference)}).brief()


def _stored(rows: list[dict], key: str, default):
    """The first stored intervals' `key` (every row of one with_intervals call holds the same)."""
    return next((r[INTERVALS][key] for r in rows if key in r.get(INTERVALS, {})), default)


def score_columns(rows: list[dict]):
    """Accuracy per task, its mean, then what the merge cost (seconds, peak MB)."""
    return [*task_columns(rows), *run_columns()[1:]]


def interval_columns(rows: list[dict]):
    """Calibration samples, mean normalized accuracy with its interval, the paired difference from the reference."""
    confidence, reference = _stored(rows, "confidence", CONFIDENCE), _stored(rows, "reference", REFERENCE)
    return [("method", lambda r: r["label"]), run_columns()[0], (f"mean norm. [{confidence:.0%}]", mean_cell),
            (f"vs {reference} [paired {confidence:.0%}]", vs_cell)]


def legend(rows: list[dict]) -> str:
    """How to read interval_columns, in lines of at most 100 characters."""
    reference = _stored(rows, "reference", REFERENCE)
    return ("mean norm.: accuracy / the task's own LoRA's, mean over tasks, with a bootstrap interval over the\n"
            f"test examples; vs {reference}: the paired difference (row - {reference}), ahead / behind when its\n"
            f"interval excludes 0; {MISSING}: no per-example outcomes stored.")


def results_tables(rows: list[dict]) -> str:
    """What `iteris-lab demo` / `bench` print and write to <track>.md: accuracy per task and the cost, then the
    intervals (rows as with_intervals returns them; rows without intervals show "—")."""
    return "\n\n".join([markdown_table(rows, score_columns), markdown_table(rows, interval_columns), legend(rows)])
