"""Shared test setup: CI-sized settings before anything heavy is imported, and factories over tmp_path.

Tiny models, adapters and batches live in tests/tiny.py, importable as `tiny` (pyproject's pythonpath).
"""
import os

for _name, _value in {
    "ITERIS_PROFILE": "ci",
    "TQDM_DISABLE": "1",
    "MPLBACKEND": "Agg",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}.items():
    os.environ.setdefault(_name, _value)

import itertools  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from tiny import make_lora, merge_case, save_tiny  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seeded_global_rng():
    """A test that draws from the global RNG draws the same numbers whatever ran before it."""
    torch.manual_seed(0)


@pytest.fixture
def lora_dir(tmp_path):
    """Factory: lora_dir(model, target_modules, **make_lora kwargs) -> a new adapter folder under tmp_path."""
    count = itertools.count()

    def make(model, target_modules, **kwargs):
        return make_lora(model, tmp_path / f"lora_{next(count)}", target_modules, **kwargs)

    return make


@pytest.fixture
def tiny_dir(tmp_path):
    """Factory: tiny_dir(kind, seed=0) -> a save_tiny folder under tmp_path."""
    def make(kind, seed=0):
        return save_tiny(kind, tmp_path / f"{kind}_seed{seed}", seed=seed)

    return make


@pytest.fixture
def tiny_case(tmp_path):
    """Factory: tiny_case(kind, n_tasks=2, targets=None, **lora kwargs) -> tiny.MergeCase under tmp_path."""
    count = itertools.count()

    def make(kind, n_tasks=2, targets=None, **kwargs):
        return merge_case(kind, tmp_path / f"case_{next(count)}", n_tasks=n_tasks, targets=targets, **kwargs)

    return make
