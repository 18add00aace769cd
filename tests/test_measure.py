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
