"""Thread-local modes (autocast, inference mode, no_grad) reach the calibration passes of both schedules, and the
statistics are summed in float32 whatever precision autocast runs the model in."""
import pytest
import torch

import iteris_lab
from iteris_lab.features import gram_pass
from iteris_lab.measure import distances_to
from iteris_lab.targets import Target
from tiny import TARGETS, merge_case

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)
ALL_LLAMA = TARGETS["llama"]


def relative_distance(a: dict, b: dict) -> float:
    return max(distances_to(a, b).values())


def test_statistics_under_autocast_are_float32_sums_of_the_rows_the_model_produced(tmp_path):
    case = merge_case("llama", tmp_path, n_tasks=2)
    model, name = case.model, "model.layers.1.self_attn.o_proj"  # reads the attention's bf16 output
    module = model.get_submodule(name)
    seen = []
    handle = module.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    try:
        with torch.autocast(**BF16):
            stats = gram_pass(model, {name: Target(name, module)}, case.calibration[0])
    finally:
        handle.remove()
    assert seen[0].dtype == torch.bfloat16  # the model really ran in bf16
    masks = [b["attention_mask"].bool() for b in case.calibration[0]]
    rows = torch.cat([x[m].double() for x, m in zip(seen, masks)])
    (gram,) = stats.gram.values()
    assert gram.dtype == torch.float32
    exact = rows.T @ rows
    # float32 sums of bf16 rows: rounding of float32 (~1e-7), not of bf16 (~4e-3)
    assert float((gram.double() - exact).norm() / exact.norm()) < 1e-5


@pytest.mark.parametrize("method", [dict(method="regmean"), dict(schedule="jacobi", max_iter=2)])
def test_autocast_changes_a_merge_only_by_the_models_own_bf16_rounding(tmp_path, method):
    case = merge_case("llama", tmp_path, n_tasks=2, targets=ALL_LLAMA)
    plain = iteris_lab.merge_loras(case.model, case.adapters, case.calibration, progress=False, **method)
    with torch.autocast(**BF16):  # old code: bf16 statistics, a SolveError at alpha=1e-4 for IterIS
        mixed = iteris_lab.merge_loras(case.model, case.adapters, case.calibration, progress=False, **method)
    # what remains is the bf16 rounding of the activations themselves; the statistics add none
    assert relative_distance(mixed.deltas, plain.deltas) < 0.1


@pytest.mark.parametrize("mode", ["autocast", "inference_mode"])
def test_both_schedules_agree_under_a_thread_local_mode(tmp_path, mode):
    case = merge_case("llama", tmp_path, n_tasks=2, targets=ALL_LLAMA)
    context = (lambda: torch.autocast(**BF16)) if mode == "autocast" else torch.inference_mode
    with context():
        sweep = iteris_lab.merge_loras(case.model, case.adapters, case.calibration, schedule="sweep", progress=False)
        jacobi = iteris_lab.merge_loras(case.model, case.adapters, case.calibration, schedule="jacobi", max_iter=20,
                                        progress=False)
    assert relative_distance(sweep.deltas, jacobi.deltas) <= 1e-5
    plain = iteris_lab.merge_loras(case.model, case.adapters, case.calibration, schedule="sweep", progress=False)
    if mode == "inference_mode":  # inference mode changes nothing numerically, and the result is usable outside it
        assert relative_distance(sweep.deltas, plain.deltas) == 0
        sweep.save_adapter(tmp_path / "merged")
    else:
        assert relative_distance(sweep.deltas, plain.deltas) > 1e-4  # the passes did run in bf16


@pytest.mark.parametrize("schedule", ["sweep", "jacobi"])
def test_every_calibration_pass_sees_the_callers_modes(tmp_path, schedule):
    case = merge_case("llama", tmp_path, n_tasks=2)
    seen = set()

    def forward(model, batch):
        seen.add((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), torch.is_grad_enabled(),
                  torch.is_inference_mode_enabled()))
        return model(**batch)

    with torch.autocast("cpu", dtype=torch.float16), torch.inference_mode():
        iteris_lab.merge_loras(case.model, case.adapters, case.calibration, schedule=schedule,
                               **({"max_iter": 2} if schedule == "jacobi" else {}),
                               forward=forward, progress=False)
    assert seen == {(True, torch.float16, False, True)}


def test_a_pass_keeps_the_modes_it_set_itself_across_its_stops(tmp_path):
    case = merge_case("llama", tmp_path, n_tasks=2)
    inside = []

    def forward(model, batch):  # full precision for this pass only: other passes run while it is stopped
        with torch.autocast("cpu", enabled=False):
            out = model(**batch)
            inside.append(torch.is_autocast_enabled("cpu"))
        return out

    with torch.autocast(**BF16):
        result = iteris_lab.merge_loras(case.model, case.adapters, case.calibration, schedule="sweep",
                                        forward=[forward, None], progress=False)
        assert torch.is_autocast_enabled("cpu")  # the caller's mode is its own again
    assert inside and not any(inside)
    assert all(torch.isfinite(d).all() for d in result.deltas.values())
