"""Run-size profiles for notebooks, the demo and benchmarks, picked by the ITERIS_PROFILE variable.

ci   smallest settings that still show every effect (nbval in CI, 2 CPU cores)
cpu  the default on a laptop: the real offline models, a few minutes per notebook
gpu  the paper's settings on a CUDA machine with internet (hub models)
"""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Profile:
    name: str
    calibration_samples: int  # unlabeled samples per task for IterIS / RegMean (the paper: 20-60)
    many_samples: int  # RegMean with "many" samples, for the sample-efficiency comparison
    max_iter: int  # IterIS solves
    test_limit: int | None  # evaluation examples per task (None: the whole test split)
    batch_size: int


PROFILES = {
    "ci": Profile("ci", calibration_samples=16, many_samples=64, max_iter=3, test_limit=64, batch_size=16),
    "cpu": Profile("cpu", calibration_samples=50, many_samples=500, max_iter=10, test_limit=None, batch_size=16),
    "gpu": Profile("gpu", calibration_samples=50, many_samples=1000, max_iter=10, test_limit=None, batch_size=32),
}


def current_profile(default: str = "cpu") -> Profile:
    """The profile named by $ITERIS_PROFILE (ci | cpu | gpu), else `default`."""
    name = os.environ.get("ITERIS_PROFILE", default).strip().lower() or default
    if name not in PROFILES:
        raise ValueError(f"ITERIS_PROFILE={name!r} is not one of {', '.join(PROFILES)}.")
    return PROFILES[name]
