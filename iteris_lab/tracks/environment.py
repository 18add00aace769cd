"""What a result was measured with: library versions, cores, device, and on request the load average, the
machine, the date and the git commit. One probe per JSON key; each writer picks its keys, so the benchmark JSON
(harness), benchmarks/study.py and benchmarks/performance.py share the probes and keep the keys they always wrote."""
from __future__ import annotations

import importlib
import os
import platform
import time
from pathlib import Path
from typing import Callable

import torch


def _commit(root) -> str | None:
    """The short git commit checked out at `root`; None outside a git checkout (a wheel install) or without git."""
    import subprocess

    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=root)
    except OSError:
        return None
    return done.stdout.strip() or None


def _version(package: str) -> Callable:
    return lambda root: importlib.import_module(package).__version__


def _device(root) -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


PROBES = {  # JSON key -> probe(root)
    "python": lambda root: platform.python_version(),
    "torch": _version("torch"),
    "transformers": _version("transformers"),
    "peft": _version("peft"),
    "cpu_count": lambda root: os.cpu_count(),
    "torch_threads": lambda root: torch.get_num_threads(),
    "machine": lambda root: platform.machine(),
    "processor": lambda root: platform.processor(),
    "load_average_at_start": lambda root: os.getloadavg(),  # the runs share machines: is the timing comparable?
    "commit": _commit,
    "device": _device,
    "date": lambda root: time.strftime("%Y-%m-%d %H:%M"),
}
BENCH_KEYS = ("python", "torch", "transformers", "peft", "cpu_count", "torch_threads", "device")


def environment(keys=BENCH_KEYS, root=None) -> dict:
    """{key: value} for each of `keys` (of PROBES), in that order; "commit" reads the git checkout at `root`
    (default: the one holding this package, if any)."""
    root = root or Path(__file__).resolve().parent
    return {key: PROBES[key](root) for key in keys}
