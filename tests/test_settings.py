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
    choices = dict(schedule="jacobi", max_iter=2, alpha=1e-3, adaptive_weights="paper", weights=[1.0, 2.0])
    by_keywords = iteris_lab.merge_loras(case.model, case.adapters, case.calibration, progress=False, **choices)
    by_object = iteris_lab.merge_loras(case.model, case.adapters, case.calibration, progress=False,
                                       settings=MergeSettings(**choices))
    assert by_keywords.settings == by_object.settings
    assert all(torch.equal(by_keywords.deltas[n], by_object.deltas[n]) for n in by_keywords.deltas)


def test_settings_and_keywords_together_are_refused(tiny_case):
    case = tiny_case("mlp")
    with pytest.raises(IterisError, match="either settings"):
        iteris_lab.merge_loras(case.model, case.adapters, case.calibration, settings=MergeSettings(),
                               schedule="jacobi", max_iter=2)


@pytest.mark.parametrize("choices, match", [
    ({"schedule": "gauss-seidel"}, "unknown schedule 'gauss-seidel'; choose one of sweep, jacobi"),
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


def test_resolved_settings_make_regmean_one_plain_solve_and_jacobi_ten_solves_by_default():
    regmean = MergeSettings(method="regmean", alpha=1e-2, schedule="jacobi", max_iter=5).resolved(3)
    assert (regmean.max_iter, regmean.alpha, regmean.adaptive_weights, regmean.weights) == (1, 0.0, "none", (1.0,) * 3)
    assert regmean.shrink == 0.9 and MergeSettings().shrink == 1.0
    assert MergeSettings(method="regmean").resolved(2).schedule == "jacobi"  # one solve, whatever the default
    assert MergeSettings(schedule="jacobi").resolved(2).max_iter == 10
    assert (MergeSettings().schedule, MergeSettings().resolved(2).max_iter) == ("sweep", None)
    assert MergeSettings(method="linear").resolved(4).weights == (0.25,) * 4
    with pytest.raises(IterisError, match="got 1 weights for 2 adapters"):
        MergeSettings(weights=[1.0]).resolved(2)


@pytest.mark.parametrize("counts", [dict(max_iter=3), dict(tol=1e-3), dict(max_iter=3, tol=1e-3)])
def test_solve_counts_without_the_jacobi_schedule_are_refused_with_the_fix(counts):
    """The default schedule is the sweep, which has no solves to count: max_iter or tol alone would be ignored."""
    with pytest.raises(IterisError, match="schedule='jacobi'"):
        MergeSettings(**counts)
    assert MergeSettings(schedule="jacobi", **counts).resolved(2).max_iter == counts.get("max_iter", 10)
    assert MergeSettings(method="linear", **counts).method == "linear"  # data-free: nothing to count either way
