"""MergeSettings: the typed, checked choices behind merge_loras' keywords."""
import dataclasses

import pytest
import torch

import iteris_lab
from iteris_lab import IterisError, MergeSettings
from iteris_lab.baselines import DATA_FREE
from iteris_lab.settings import METHODS, SOLVED


def test_the_methods_are_the_solved_ones_and_the_data_free_baselines():
    assert set(METHODS) == set(SOLVED) | set(DATA_FREE) and len(METHODS) == len(SOLVED) + len(DATA_FREE)


def test_a_settings_object_merges_exactly_as_the_same_keywords(tiny_case):
    case = tiny_case("mlp")
    choices = dict(max_iter=2, alpha=1e-3, adaptive_weights="paper", weights=[1.0, 2.0])
    by_keywords = iteris_lab.merge_loras(case.model, case.adapters, case.calibration, progress=False, **choices)
    by_object = iteris_lab.merge_loras(case.model, case.adapters, case.calibration, progress=False,
                                       settings=MergeSettings(**choices))
    assert by_keywords.settings == by_object.settings
    assert all(torch.equal(by_keywords.deltas[n], by_object.deltas[n]) for n in by_keywords.deltas)


def test_settings_and_keywords_together_are_refused(tiny_case):
    case = tiny_case("mlp")
    with pytest.raises(IterisError, match="either settings"):
        iteris_lab.merge_loras(case.model, case.adapters, case.calibration, settings=MergeSettings(), max_iter=2)


@pytest.mark.parametrize("choices, match", [
    ({"schedule": "gauss-seidel"}, "unknown schedule 'gauss-seidel'; choose one of jacobi, sweep"),
    ({"gram_dtype": "float16"}, "gram_dtype must be one of"), ({"tol": -1.0}, "tol must be None"),
    ({"regmean_shrink": 2.0}, r"regmean_shrink must be in \[0, 1\]"), ({"max_iter": 1.5}, "max_iter"),
    ({"method": "regmean", "weights": [1.0, -1.0]}, "must be >= 0")])
def test_bad_choices_are_refused_when_the_settings_are_built(choices, match):
    with pytest.raises(IterisError, match=match):
        MergeSettings(**choices)


def test_settings_are_frozen_and_normalized():
    settings = MergeSettings(gram_dtype=torch.float64, weights=[1, 2])
    assert settings.gram_dtype == "float64" and settings.gram_torch_dtype is torch.float64
    assert settings.weights == (1.0, 2.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.alpha = 0.0


def test_resolved_settings_make_regmean_one_plain_solve_and_the_sweep_one_pass():
    regmean = MergeSettings(method="regmean", alpha=1e-2, max_iter=5).resolved(3)
    assert (regmean.max_iter, regmean.alpha, regmean.adaptive_weights, regmean.weights) == (1, 0.0, "none", (1.0,) * 3)
    assert regmean.shrink == 0.9 and MergeSettings().shrink == 1.0
    sweep = MergeSettings(schedule="sweep", tol=1e-3).resolved(2)
    assert (sweep.max_iter, sweep.tol) == (1, None)
    assert MergeSettings(method="linear").resolved(4).weights == (0.25,) * 4
    with pytest.raises(IterisError, match="got 1 weights for 2 adapters"):
        MergeSettings(weights=[1.0]).resolved(2)
