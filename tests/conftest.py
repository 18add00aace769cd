"""Shared test setup: factories over tmp_path (the environment defaults are in the root conftest.py).

Tiny models, adapters and batches live in tests/tiny.py, importable as `tiny` (pyproject's pythonpath).
"""
import itertools
import os

import pytest
import torch

from tiny import make_lora, merge_case, save_tiny

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
