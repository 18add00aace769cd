"""The one training loop: its schedules against their formulas, and its updates against a hand-written AdamW loop."""
import math

import pytest
import torch

from iteris_lab.tracks.training import SCHEDULES, LoraTraining, Training, lr_factor, train


def test_schedules_follow_their_formulas():
    steps, warmup = 100, 10
    assert [lr_factor("linear_warmup_decay", s, steps, warmup) for s in (0, 9)] == [0.1, 1.0]
    assert lr_factor("linear_warmup_decay", 10, steps, warmup) == 1.0
    assert lr_factor("linear_warmup_decay", 100, steps, warmup) == pytest.approx(0.1)  # one past the last step
    assert lr_factor("cosine", 55, steps, warmup) == pytest.approx(0.55)  # half way down from 1 to 0.1
    assert lr_factor("cosine", 100, steps, warmup) == pytest.approx(0.1)
    assert lr_factor("ramped_linear_decay", 4, steps, warmup) == pytest.approx(0.5 * (1 - 0.9 * 4 / 100))
    assert lr_factor("constant", 4, steps, warmup) == 0.5 and lr_factor("constant", 50, steps, 0) == 1.0
    assert set(SCHEDULES) == {"linear_warmup_decay", "cosine", "ramped_linear_decay", "constant"}


def test_settings_are_validated():
    with pytest.raises(ValueError, match="schedule"):
        Training(schedule="step")
    with pytest.raises(ValueError, match="steps"):
        Training(steps=0)
    assert LoraTraining(rank=4).steps == Training().steps  # one settings shape, extended


def _problem():
    torch.manual_seed(0)
    x, y = torch.randn(32, 5), torch.randn(32, 1)
    return torch.nn.Linear(5, 1), x, y


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_train_makes_the_same_updates_as_a_hand_written_adamw_loop(schedule):
    settings = Training(steps=12, lr=0.05, batch_size=8, warmup_steps=3, schedule=schedule, weight_decay=0.01,
                        max_norm=0.5)
    model, x, y = _problem()
    reference = torch.nn.Linear(5, 1)
    reference.load_state_dict(model.state_dict())

    def loss_of(m, step):
        rows = slice(8 * (step % 4), 8 * (step % 4) + 8)
        return ((m(x[rows]) - y[rows]) ** 2).mean()

    losses = train(model.parameters(), lambda s: loss_of(model, s), settings)
    optimizer = torch.optim.AdamW(reference.parameters(), lr=0.05, weight_decay=0.01)
    expected = []
    for step in range(12):
        for group in optimizer.param_groups:  # the schedule, written out
            if schedule == "cosine":
                factor = (step + 1) / 3 if step < 3 else 0.1 + 0.45 * (1 + math.cos(math.pi * (step - 3) / 9))
            elif schedule == "linear_warmup_decay":
                factor = (step + 1) / 3 if step < 3 else 1.0 - 0.9 * (step - 3) / 9
            elif schedule == "ramped_linear_decay":
                factor = min(1.0, (step + 1) / 3) * (1 - 0.9 * step / 12)
            else:
                factor = min(1.0, (step + 1) / 3)
            group["lr"] = 0.05 * factor
        loss = loss_of(reference, step)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
        optimizer.step()
        expected.append(loss.item())
    assert losses == pytest.approx(expected, rel=1e-6)
    assert torch.allclose(model.weight, reference.weight, atol=1e-6)


def test_on_step_stops_early_and_a_non_finite_loss_is_an_error():
    model, x, y = _problem()
    settings = Training(steps=10, lr=0.01, batch_size=32, warmup_steps=0)
    losses = train(model.parameters(), lambda s: ((model(x) - y) ** 2).mean(), settings, on_step=lambda s, _: s == 2)
    assert len(losses) == 3
    with pytest.raises(RuntimeError, match="non-finite loss"):
        train(model.parameters(), lambda s: model(x).sum() * float("nan"), settings)
