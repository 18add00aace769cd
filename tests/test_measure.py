"""measure.distances_to: the distance of a merge to a reference merge, layer by layer."""
import pytest
import torch

from iteris_lab.measure import distances_to


def test_distance_is_the_relative_frobenius_error_per_layer_of_the_reference():
    reference = {"q": torch.tensor([[3.0, 4.0]]), "v": torch.ones(2, 2, dtype=torch.float32)}
    moved = {"q": torch.tensor([[3.0, 4.0]]) + torch.tensor([[0.0, 1.0]]), "v": torch.ones(2, 2), "extra": torch.ones(1)}
    distances = distances_to(moved, reference)
    assert set(distances) == {"q", "v"}  # the reference's layers only
    assert distances["q"] == pytest.approx(1.0 / 5.0)  # ‖(0, 1)‖ / ‖(3, 4)‖
    assert distances["v"] == 0.0


def test_distance_is_computed_in_float64():
    reference = {"w": torch.full((1,), 1.0, dtype=torch.float32)}
    moved = {"w": torch.full((1,), 1.0 + 2.0 ** -20, dtype=torch.float32)}
    assert distances_to(moved, reference)["w"] == pytest.approx(2.0 ** -20, rel=1e-12)


def test_paired_difference_interval_excludes_zero_only_for_a_real_difference():
    import numpy as np

    from iteris_lab.measure import paired_difference

    rng = np.random.default_rng(0)
    b = (rng.random(400) < 0.6).astype(int)
    better = b.copy()
    better[rng.choice(np.flatnonzero(b == 0), 60, replace=False)] = 1  # 60 of 400 examples fixed, none broken
    ahead = paired_difference(better, b)
    assert ahead.mean == pytest.approx(60 / 400) and ahead.low > 0 and ahead.verdict == "ahead"
    assert ahead.p_value < 1e-10  # McNemar: 60 discordant pairs, all one way
    assert paired_difference(b, better).verdict == "behind"
    noise = b.copy()
    noise[np.flatnonzero(b == 0)[:4]] = 1  # 4 examples fixed, 3 broken: 7 discordant pairs, +1 net
    noise[np.flatnonzero(b == 1)[:3]] = 0
    assert paired_difference(noise, b).verdict == "within noise"


def test_paired_difference_is_seeded_and_its_pairing_narrows_the_interval():
    import numpy as np

    from iteris_lab.measure import paired_difference

    rng = np.random.default_rng(1)
    hard = rng.normal(size=300)  # a per-example difficulty both models share
    a, b = hard + 0.05 + 0.01 * rng.normal(size=300), hard + 0.01 * rng.normal(size=300)
    first, again = paired_difference(a, b, seed=3), paired_difference(a, b, seed=3)
    assert first == again
    assert first.p_value is None  # scores, not 0/1 outcomes
    unpaired_se = np.sqrt(a.var(ddof=1) / 300 + b.var(ddof=1) / 300)
    assert first.high - first.low < 0.2 * (2 * 1.96 * unpaired_se)
    assert first.verdict == "ahead"


def test_paired_difference_refuses_unpaired_or_non_finite_outcomes():
    from iteris_lab.measure import paired_difference

    with pytest.raises(ValueError, match="equally long"):
        paired_difference([1, 0, 1], [1, 0])
    with pytest.raises(ValueError, match="NaN"):
        paired_difference([1.0, float("nan")], [1.0, 0.0])


def test_numerical_rank_reads_a_float32_gram_of_fewer_rows_than_features_as_its_row_count():
    from iteris_lab.measure import numerical_rank

    x = torch.randn(50, 384, generator=torch.Generator().manual_seed(0))
    assert numerical_rank(x.T @ x) == 50
    assert numerical_rank((x.T @ x).double()) == 384  # float32 rounding is far above float64's ε: use the sum's dtype
    assert numerical_rank(x.double().T @ x.double()) == 50


def test_few_differing_examples_are_within_noise_even_when_the_bootstrap_interval_excludes_zero():
    """4 of 60 examples differ, all for a: the percentile interval lies above 0, but the exact McNemar p is
    2 · 0.5^4 = 0.125, and the verdict follows the exact test."""
    from iteris_lab.measure import paired_difference

    a, b = [1] * 4 + [0] * 56, [0] * 60
    few = paired_difference(a, b)
    assert few.low > 0 and few.p_value == pytest.approx(0.125) and few.verdict == "within noise"
    many = paired_difference([1] * 12 + [0] * 48, [0] * 60)  # 12 one way: p = 2 · 0.5^12
    assert many.p_value < 0.001 and many.verdict == "ahead"
    scores = paired_difference([0.5] * 4 + [0.0] * 56, [0.0] * 60)  # not 0/1: the interval alone decides
    assert scores.p_value is None and scores.verdict == "ahead"
