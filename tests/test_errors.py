"""Bad input gets a clear error that names the problem, and nothing is modified."""
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

import iteris_lab
from iteris_lab import AdapterError, CalibrationError, ExportError, IterisError, SolveError
from tiny import TARGETS, build_tiny, make_lora, merge_case


def fingerprint(model, folders):
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    files = {p: hashlib.sha256(p.read_bytes()).hexdigest() for f in folders for p in Path(f).iterdir()}
    return weights, files


@pytest.fixture
def case(tmp_path):
    return merge_case("llama", tmp_path / "case", n_tasks=2)


def merge(case, **kwargs):
    kwargs.setdefault("progress", False)
    adapters = kwargs.pop("adapters", case.adapters)
    calibration = kwargs.pop("calibration", case.calibration)
    return iteris_lab.merge_loras(case.model, adapters, calibration, **kwargs)


def assert_fails_cleanly(case, error, match, **kwargs):
    weights, files = fingerprint(case.model, [a for a in case.adapters if os.path.isdir(a)])
    with pytest.raises(error, match=match):
        merge(case, **kwargs)
    after, files_after = fingerprint(case.model, [a for a in case.adapters if os.path.isdir(a)])
    assert all(torch.equal(weights[k], after[k]) for k in weights)
    assert files == files_after


def test_fewer_than_two_adapters(case):
    assert_fails_cleanly(case, AdapterError, "at least two", adapters=case.adapters[:1], calibration=case.calibration[:1])


def test_calibration_count_differs_from_adapter_count(case):
    assert_fails_cleanly(case, CalibrationError, "calibration for 1 tasks but 2 adapters", calibration=case.calibration[:1])


def test_missing_calibration_is_refused(case):
    assert_fails_cleanly(case, CalibrationError, "need calibration", calibration=None)


def test_task_with_only_padding(case):
    dead = [{k: (torch.zeros_like(v) if k == "attention_mask" else v) for k, v in b.items()} for b in case.calibration[1]]
    assert_fails_cleanly(case, CalibrationError, "task 1: no real tokens", calibration=[case.calibration[0], dead])


def test_an_empty_task_is_refused_naming_the_task(case):
    assert_fails_cleanly(case, CalibrationError, "task 1: the calibration data is empty", calibration=[case.calibration[0], []])


def test_nan_features_are_refused_naming_the_task_and_layer(tmp_path):
    case = merge_case("mlp", tmp_path, n_tasks=2)
    bad = [b.clone() for b in case.calibration[1]]
    bad[0][0, 0] = float("nan")
    assert_fails_cleanly(case, CalibrationError, "task 1: features of layer 0 contain NaN", calibration=[case.calibration[0], bad])


def test_alpha_zero_with_a_singular_gram_names_the_layer(case):
    tiny = [[{k: v[:1, :2] for k, v in case.calibration[i][0].items()}] for i in range(2)]
    assert_fails_cleanly(case, SolveError, r"layer model\.layers\.0\.\S+: \d+ calibration rows .* alpha", calibration=tiny, alpha=0.0)


def test_adapter_shapes_that_do_not_fit_the_base(case, tmp_path):
    other = build_tiny("llama")
    wider = torch.nn.Linear(32, 48, bias=False)
    other.model.layers[0].self_attn.q_proj = wider
    foreign = make_lora(other, tmp_path / "foreign", TARGETS["llama"], seed=9)
    assert_fails_cleanly(case, AdapterError, "q_proj has ΔW of shape .*trained on another base",
                         adapters=[case.adapters[0], foreign])


def test_adapters_with_different_module_sets(case, tmp_path):
    partial = make_lora(case.model, tmp_path / "partial", ["q_proj", "v_proj"], seed=5)
    assert_fails_cleanly(case, AdapterError, "target different modules.*intersection.*union", adapters=[case.adapters[0], partial])
    inter = merge(case, adapters=[case.adapters[0], partial], modules="intersection", schedule="jacobi", max_iter=1)
    union = merge(case, adapters=[case.adapters[0], partial], modules="union", schedule="jacobi", max_iter=1)
    assert all(n.endswith(("q_proj", "v_proj")) for n in inter.deltas)
    assert len(union.deltas) > len(inter.deltas)


def test_missing_and_corrupt_adapter_files(case, tmp_path):
    assert_fails_cleanly(case, AdapterError, "does not exist", adapters=[case.adapters[0], str(tmp_path / "nope")])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    assert_fails_cleanly(case, AdapterError, "could not be read", adapters=[case.adapters[0], str(broken)])
    (broken / "adapter_config.json").write_text("{not json")
    assert_fails_cleanly(case, AdapterError, "not valid JSON", adapters=[case.adapters[0], str(broken)])
    (broken / "adapter_config.json").unlink()
    assert_fails_cleanly(case, AdapterError, "adapter_config.json is missing", adapters=[case.adapters[0], str(broken)])


@pytest.mark.parametrize("flag, match", [({"use_dora": True}, "DoRA"), ({"peft_type": "IA3"}, "IA3 is not supported"),
                                         ({"bias": "all"}, "bias='all'")])
def test_unsupported_adapter_types(case, tmp_path, flag, match):
    import shutil
    odd = tmp_path / "odd"
    shutil.copytree(case.adapters[1], odd)
    config = json.loads((odd / "adapter_config.json").read_text())
    config.update(flag)
    (odd / "adapter_config.json").write_text(json.dumps(config))
    assert_fails_cleanly(case, AdapterError, match, adapters=[case.adapters[0], str(odd)])


def test_model_that_already_has_adapters(case):
    from peft import PeftModel
    wrapped = PeftModel.from_pretrained(case.model, case.adapters[0])
    with pytest.raises(AdapterError, match="already carries a PEFT adapter"):
        iteris_lab.merge_loras(wrapped.base_model.model, case.adapters, case.calibration, progress=False)


@pytest.mark.parametrize("kwargs, match", [
    ({"method": "average"}, "unknown method"), ({"max_iter": 0}, "max_iter"), ({"alpha": -1.0}, "alpha"),
    ({"adaptive_weights": "magic"}, "adaptive_weights"), ({"density": 0.0}, "density"),
    ({"modules": "some"}, "modules"), ({"weights": [1.0]}, "1 weights for 2 adapters")])
def test_bad_settings_are_refused_before_any_work(case, kwargs, match):
    assert_fails_cleanly(case, IterisError, match, **kwargs)


def test_output_directory_is_refused_unless_overwrite(case, tmp_path):
    result = merge(case, method="linear")
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="already exists.*overwrite"):
        result.save_adapter(target)
    assert (target / "keep.txt").read_text() == "mine"
    with pytest.raises(ExportError, match="not an adapter folder.*not replaced"):  # issue 12 case 1
        result.save_adapter(target, overwrite=True)
    assert (target / "keep.txt").read_text() == "mine"
    (target / "keep.txt").unlink()
    result.save_adapter(target, overwrite=True)  # an empty folder, then an adapter folder, are replaced
    result.save_adapter(target, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_failed_export_leaves_no_half_written_adapter(case, tmp_path, monkeypatch):
    result = merge(case, method="linear")
    import iteris_lab.io.export as export

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export, "save_file", explode)
    with pytest.raises(OSError):
        result.save_adapter(tmp_path / "half")
    assert list(tmp_path.iterdir()) == [tmp_path / "case"]


@pytest.mark.parametrize("name", ["../escape.txt", "sub/card.md", "adapter_config.json", ""])
def test_extra_file_names_must_be_plain_names_other_than_the_adapter_files(case, tmp_path, name):
    result = merge(case, method="linear")
    with pytest.raises(ExportError, match="give a plain file name"):
        result.save_adapter(tmp_path / "out", extra_files={name: "x"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case"]


def test_save_adapter_without_overwrite_names_the_option(case, tmp_path):
    result = merge(case, method="linear")
    result.save_adapter(tmp_path / "out")
    with pytest.raises(ExportError, match=r"out already exists; pass overwrite=True \(CLI: --overwrite\)"):
        result.save_adapter(tmp_path / "out")


def test_error_mid_merge_restores_the_weights(case):
    calls = {"n": 0}

    def flaky(model, batch):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("boom")
        return model(**batch)

    assert_fails_cleanly(case, RuntimeError, "boom", forward=flaky, schedule="jacobi", max_iter=3)


def test_apply_to_a_different_model_is_refused(case, tmp_path):
    result = merge(case, method="linear")
    with pytest.raises(AdapterError):
        result.apply_to(build_tiny("mlp"))
