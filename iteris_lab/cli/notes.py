"""Nothing accepted silently: a setting the chosen method cannot use is named in a note on stderr.

Decided case by case (docs/reliability.md, "Settings that cannot take effect"): these are notes, not errors, so
that one command line or recipe can be re-run with another --method; the merge itself is unchanged by them.
"""
from __future__ import annotations

import sys
from dataclasses import fields

from ..settings import SOLVED, MergeSettings

PRUNED = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
_CALIBRATION = ("calibration", "batch_size", "max_length", "chat_template", "encoding")
# the options the command passes to merge_loras: MergeSettings' fields but those that tokenize the calibration
# files (the command tokenizes them itself)
SETTINGS = tuple(f.name for f in fields(MergeSettings) if f.name not in _CALIBRATION)
# option -> the methods that use it (anything not listed here is used by every method)
USED_BY = {
    **{k: SOLVED for k in _CALIBRATION + ("gram_dtype",)},
    "schedule": ("iteris",), "max_iter": ("iteris",), "tol": ("iteris",), "alpha": ("iteris",),
    "adaptive_weights": ("iteris",), "regmean_shrink": ("regmean",),
    "density": PRUNED, "seed": ("dare_linear", "dare_ties"),
}


def note(line: str) -> None:
    print(f"iteris-lab merge: note: {line}", file=sys.stderr, flush=True)


def option(name: str) -> str:
    return "--" + name.replace("_", "-")


def unused(method: str, given, schedule: str = "sweep") -> list[str]:
    """The given options that `method` (and, for iteris, `schedule`) does not use."""
    names = [k for k in sorted(given) if k in USED_BY and method not in USED_BY[k]]
    if method == "iteris" and schedule == "sweep":
        names += [k for k in ("max_iter", "tol") if k in given]  # the sweep is one pass: no iterations to count
    return names


def unused_settings(method: str, given, schedule: str = "sweep") -> None:
    """Print one note naming every given option that cannot take effect."""
    names = unused(method, given, schedule)
    if not names:
        return
    why = "it is data-free" if method not in SOLVED else "--schedule sweep solves each layer once" \
        if set(names) <= {"max_iter", "tol"} else "it does not use them"
    files = " (the calibration files are not read)" if "calibration" in names else ""
    note(f"{', '.join(option(n) for n in names)} {'has' if len(names) == 1 else 'have'} no effect with --method "
         f"{method}{' --schedule ' + schedule if set(names) <= {'max_iter', 'tol'} else ''}: {why}; ignored{files}.")
