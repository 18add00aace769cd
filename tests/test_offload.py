"""Models loaded with accelerate's device_map, a layer offloaded to disk (its weights on the meta device): every
schedule merges them as it merges the model in memory, and nothing on disk or in the model changes."""
import copy
import hashlib
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

import iteris_lab
from iteris_lab.errors import ExportError
from tiny import ALL_LLAMA, merge_case, outputs, relative_distance, save_tiny

DEVICE_MAP = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
              "model.layers.1": "disk", "model.norm": "cpu", "lm_head": "cpu"}


def digest(folder) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.fixture
def offloaded(tmp_path):
    case = merge_case("llama", tmp_path / "adapters", n_tasks=2, targets=ALL_LLAMA)
    base = save_tiny("llama", tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(base, device_map=DEVICE_MAP, offload_folder=str(tmp_path / "off"))
    assert model.model.layers[1].self_attn.q_proj.weight.device.type == "meta"
    return case, model, tmp_path


@pytest.mark.parametrize("spec", [dict(schedule="sweep"), dict(schedule="jacobi", max_iter=3), dict(method="regmean"),
                                  dict(schedule="jacobi", max_iter=2, adaptive_weights="paper")])
def test_an_offloaded_model_merges_as_the_model_in_memory(offloaded, spec):
    case, model, tmp_path = offloaded
    on_disk = digest(tmp_path / "base") | digest(tmp_path / "off")
    state = {k: v.clone() for k, v in model.state_dict().items() if v.device.type != "meta"}
    merged = iteris_lab.merge_loras(model, case.adapters, case.calibration, progress=False, **spec)
    reference = iteris_lab.merge_loras(case.model, case.adapters, case.calibration, progress=False, **spec)
    assert relative_distance(merged.deltas, reference.deltas) <= 1e-5
    assert digest(tmp_path / "base") | digest(tmp_path / "off") == on_disk
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_the_merge_of_an_offloaded_model_exports_an_adapter_peft_loads(offloaded):
    case, model, tmp_path = offloaded
    result = iteris_lab.merge_loras(model, case.adapters, case.calibration, schedule="sweep", progress=False)
    report = result.save_adapter(tmp_path / "merged")
    batch = case.calibration[0][0]
    dense = outputs(result.apply_to(copy.deepcopy(case.model)), batch)
    assert torch.allclose(outputs(PeftModel.from_pretrained(copy.deepcopy(case.model), report.path).eval(), batch),
                          dense, atol=1e-4)


def test_apply_to_refuses_offloaded_weights_and_points_to_save_adapter(offloaded):
    case, model, _ = offloaded
    result = iteris_lab.merge_loras(model, case.adapters, case.calibration, method="linear", progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items() if v.device.type != "meta"}
    with pytest.raises(ExportError, match="save_adapter"):
        result.apply_to(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_weights_on_meta_without_an_offload_store_are_refused(tmp_path):
    case = merge_case("llama", tmp_path, n_tasks=2)
    empty = copy.deepcopy(case.model).to("meta")
    with pytest.raises(iteris_lab.AdapterError, match="meta device"):
        iteris_lab.merge_loras(empty, case.adapters, case.calibration, schedule="sweep", progress=False)
