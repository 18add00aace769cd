"""The one-sweep schedule: it reaches the fixed point of the Jacobi loop, and refuses what it cannot do."""
import threading

import pytest
import torch
from torch import nn

import iteris_lab
from iteris_lab.errors import CalibrationError
from tiny_diffusion import pixel_unet_and_loras, pixel_unet_batches as unet_batches
from tiny import ALL_LLAMA, make_lora, merge_case, relative_distance, token_batches

def assert_sweep_is_the_fixed_point(model, adapters, calibration, **kwargs):
    sweep = iteris_lab.merge_loras(model, adapters, calibration, schedule="sweep", progress=False, **kwargs)
    jacobi = iteris_lab.merge_loras(model, adapters, calibration, schedule="jacobi", max_iter=30, progress=False,
                                    **kwargs)
    assert max(jacobi.history[-1].change.values()) < 1e-5  # Jacobi itself has converged (float32 noise floor)
    assert relative_distance(sweep.deltas, jacobi.deltas) <= 1e-5
    # λ and the objective are recorded as Jacobi records them (its last solve is at the same point)
    (record,) = sweep.history
    last = jacobi.history[-1]
    for name in jacobi.deltas:
        assert record.lambdas[name] == pytest.approx(last.lambdas[name], rel=1e-9)
        assert record.objective[name] == pytest.approx(last.objective[name], rel=1e-4, abs=1e-7)
        assert record.merged_objective[name] == record.objective[name]
        assert record.drift[name] == pytest.approx(last.drift[name], rel=1e-4, abs=1e-7)
    # and it is not the first solve: the merged model's features matter on these models
    first = iteris_lab.merge_loras(model, adapters, calibration, schedule="jacobi", max_iter=1, progress=False,
                                   **kwargs)
    assert relative_distance(first.deltas, jacobi.deltas) > 1e-3
    return sweep


@pytest.mark.parametrize("kind", ["llama", "bert", "t5", "gpt2", "conv"])
def test_sweep_equals_jacobi_run_past_its_fixed_point(tmp_path, kind):
    targets = ALL_LLAMA if kind == "llama" else None  # every projection: groups inside a block depend on each other
    case = merge_case(kind, tmp_path, n_tasks=3, targets=targets)
    if kind in ("llama", "t5"):  # several padded batches per task; t5 teacher-forces its decoder on labels
        case.calibration = [token_batches(kind, n_batches=3, batch_size=3, seq_len=6, seed=40 + i) for i in range(3)]
    assert_sweep_is_the_fixed_point(case.model, case.adapters, case.calibration)


def test_sweep_on_a_unet_with_conv2d_loras_and_a_denoising_forward(tmp_path):
    unet, dirs = pixel_unet_and_loras(tmp_path)
    calibration = [unet_batches(1), unet_batches(2)]
    sweep = assert_sweep_is_the_fixed_point(unet, dirs, calibration)
    assert any(delta.dim() == 4 for delta in sweep.deltas.values())


def test_sweep_with_a_forward_function_per_task_and_the_paper_weights(tmp_path):
    case = merge_case("llama", tmp_path, n_tasks=2, targets=ALL_LLAMA)
    calls = []

    def forward(model, batch):  # e.g. a recipe's teacher-forced step; must be deterministic
        calls.append(1)
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    assert_sweep_is_the_fixed_point(case.model, case.adapters, case.calibration, forward=[forward, forward],
                                    adaptive_weights="paper", alpha=1e-3)
    assert calls


def test_sweep_refuses_a_module_that_runs_twice_in_one_pass(tmp_path):
    case = merge_case("mlp", tmp_path, n_tasks=2)
    with pytest.raises(CalibrationError, match="more than once.*jacobi"):
        iteris_lab.merge_loras(case.model, case.adapters, case.calibration, schedule="sweep", progress=False,
                               forward=lambda model, batch: model(batch) + model(batch))
    # Jacobi sums both calls' rows and merges
    result = iteris_lab.merge_loras(case.model, case.adapters, case.calibration, schedule="jacobi", max_iter=2,
                                    progress=False,
                                    forward=lambda model, batch: model(batch) + model(batch))
    assert all(torch.isfinite(d).all() for d in result.deltas.values())


def test_after_the_last_layer_only_one_pass_runs_on_and_the_result_is_unchanged(tmp_path):
    """The LM head's logits are of no use to the merge: every pass but one is closed at the last adapted layer."""
    case = merge_case("llama", tmp_path, n_tasks=2)
    assert sum(len(batches) for batches in case.calibration) > 1
    heads = []
    handle = case.model.lm_head.register_forward_pre_hook(lambda module, args: heads.append(1))
    try:
        sweep = iteris_lab.merge_loras(case.model, case.adapters, case.calibration, progress=False)
    finally:
        handle.remove()
    assert len(heads) == 1  # the check before the sweep: one pass of one batch, start to end
    jacobi = iteris_lab.merge_loras(case.model, case.adapters, case.calibration, schedule="jacobi",
                                    max_iter=len(sweep.deltas), progress=False)  # past the chain's depth
    assert relative_distance(sweep.deltas, jacobi.deltas) < 1e-5


class Branchy(nn.Module):
    """Task-dependent paths: inputs with a positive first feature go through `a` then `b`, others `b` then `a`."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        if x[0, 0] > 0:
            return self.b(torch.relu(self.a(x)))
        return self.a(torch.relu(self.b(x)))


def test_sweep_refuses_passes_that_visit_layers_in_different_orders(tmp_path):
    torch.manual_seed(0)
    model = Branchy().eval()
    adapters = [make_lora(model, tmp_path / f"t{i}", ["a", "b"], seed=i + 1) for i in range(2)]
    x = torch.randn(6, 8)
    x[:, 0] = x[:, 0].abs()
    with pytest.raises(CalibrationError, match="different orders"):
        iteris_lab.merge_loras(model, adapters, [[x], [-x]], schedule="sweep", progress=False)


def test_an_error_inside_a_pass_reaches_the_caller_and_no_thread_is_left(tmp_path):
    case = merge_case("llama", tmp_path, n_tasks=2)
    before = threading.active_count()

    def broken(model, batch):  # inside the pass (its greenlet), before the model runs: passes that run after the
        raise RuntimeError("the forward function failed")  # last adapted layer are closed there, not run to the end

    with pytest.raises(RuntimeError, match="forward function failed"):
        iteris_lab.merge_loras(case.model, case.adapters, case.calibration, schedule="sweep", progress=False,
                               forward=[None, broken])
    assert threading.active_count() == before


def test_sweep_leaves_the_model_and_its_config_as_they_were(tmp_path):
    case = merge_case("llama", tmp_path, n_tasks=2)
    case.model.train()
    before = {k: v.clone() for k, v in case.model.state_dict().items()}
    cache = case.model.config.use_cache
    iteris_lab.merge_loras(case.model, case.adapters, case.calibration, schedule="sweep", progress=False)
    assert case.model.training and case.model.config.use_cache == cache
    assert all(torch.equal(before[k], v) for k, v in case.model.state_dict().items())


def test_unknown_schedule_is_refused(tmp_path):
    case = merge_case("mlp", tmp_path, n_tasks=2)
    with pytest.raises(iteris_lab.IterisError, match="schedule"):
        iteris_lab.merge_loras(case.model, case.adapters, case.calibration, schedule="gauss-seidel")
