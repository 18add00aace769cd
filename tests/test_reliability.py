"""Issue 12, "nothing silent, nothing lost": every case is a right merge or a refusal that names the problem,
and nothing the user owns is deleted. One test (or more) per case; the numbers in the names are the issue's."""
import copy
import json
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import iteris_lab
from iteris_lab import AdapterError, ExportError, IterisError, load_adapter
from iteris_lab.io import destination as export  # the writers' staged swap and recover
from tiny import TARGETS, build_tiny, make_lora, merge_case, outputs, token_batches


def merge(model, adapters, calibration=None, **kwargs):
    kwargs.setdefault("progress", False)
    kwargs.setdefault("method", "linear")
    return iteris_lab.merge_loras(model, adapters, calibration, **kwargs)


@pytest.fixture
def case(tmp_path):
    return merge_case("llama", tmp_path / "case", n_tasks=2, targets=["q_proj", "v_proj"])


def rewrite(folder, config=None, tensors=None):
    """Change an adapter folder in place: config updates (dict) and tensor updates ({key: fn(tensor)})."""
    folder = Path(folder)
    if config is not None:
        current = json.loads((folder / "adapter_config.json").read_text())
        current.update(config)
        (folder / "adapter_config.json").write_text(json.dumps(current))
    if tensors is not None:
        state = load_file(str(folder / "adapter_model.safetensors"))
        for key, fn in tensors.items():
            state[key] = fn(state[key])
        save_file(state, str(folder / "adapter_model.safetensors"))


# -- 1. overwrite never deletes what is not an adapter ------------------------------------------------------------

def test_1_overwrite_refuses_the_current_folder_and_its_parents(case, tmp_path, monkeypatch):
    result = merge(case.model, case.adapters)
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    for where in (".", str(work), str(tmp_path)):
        with pytest.raises(ExportError, match="current directory, one of its parents"):
            result.save_adapter(where, overwrite=True)
    assert (work / "notes.txt").read_text() == "mine"
    assert (tmp_path / "case").is_dir()


def test_1_overwrite_refuses_a_file_and_a_folder_without_adapter_config(case, tmp_path):
    result = merge(case.model, case.adapters)
    afile = tmp_path / "out.bin"
    afile.write_text("data")
    with pytest.raises(ExportError, match="not a folder"):
        result.save_adapter(afile, overwrite=True)
    assert afile.read_text() == "data"
    folder = tmp_path / "photos"
    (folder / "2024").mkdir(parents=True)
    (folder / "2024" / "a.jpg").write_text("x")
    with pytest.raises(ExportError, match="no adapter_config.json.*not replaced"):
        result.save_adapter(folder, overwrite=True)
    assert (folder / "2024" / "a.jpg").read_text() == "x"


# -- 3. modules_to_save and trainable tokens are never dropped silently -------------------------------------------

def _with_head(model, tmp_path, name, seed, head):
    folder = make_lora(model, tmp_path / name, ["q_proj", "v_proj"], seed=seed, modules_to_save=["lm_head"])
    rewrite(folder, tensors={"base_model.model.lm_head.weight": lambda w: head.clone()})
    return folder


def test_3_a_head_shared_by_the_adapters_is_carried_into_apply_to_and_the_export(tmp_path):
    from peft import PeftModel

    model = build_tiny("llama")
    head = torch.randn(model.lm_head.weight.shape, generator=torch.Generator().manual_seed(3))
    adapters = [_with_head(model, tmp_path, f"h{i}", i + 1, head) for i in range(2)]
    calibration = [token_batches("llama", seed=100 + i) for i in range(2)]
    result = merge(model, adapters, calibration, method="iteris", schedule="jacobi", max_iter=2)
    assert set(result.extra["carried"]) == {"lm_head.weight"} and result.settings["modules_to_save"] == ["lm_head"]
    batch = token_batches("llama", seed=7)[0]
    dense = outputs(result.apply_to(copy.deepcopy(model)), batch)
    report = result.save_adapter(tmp_path / "merged")
    config = json.loads((tmp_path / "merged" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["lm_head"]
    loaded = outputs(PeftModel.from_pretrained(copy.deepcopy(model), report.path), batch)
    without_head = copy.deepcopy(result)
    without_head.extra["carried"] = {}
    no_head = outputs(without_head.apply_to(copy.deepcopy(model)), batch)
    assert torch.allclose(dense, loaded, atol=1e-4)
    assert (dense - no_head).abs().max() > 1e-2  # the head really changes the outputs


def test_3_different_heads_are_refused_and_the_lora_parts_can_still_be_merged(tmp_path):
    model = build_tiny("llama")
    heads = [torch.randn(model.lm_head.weight.shape, generator=torch.Generator().manual_seed(s)) for s in (3, 4)]
    adapters = [_with_head(model, tmp_path, f"h{i}", i + 1, heads[i]) for i in range(2)]
    with pytest.raises(AdapterError, match="different trained modules.*lm_head.*extra emptied"):
        merge(model, adapters)
    loras = [load_adapter(a) for a in adapters]
    for lora in loras:
        lora.extra.clear()
    assert not merge(model, loras).extra["carried"]


def test_3_trainable_tokens_are_refused(tmp_path):
    model = build_tiny("llama")
    tokens = make_lora(model, tmp_path / "tok", ["q_proj", "v_proj"], seed=1, trainable_token_indices=[3, 4])
    plain = make_lora(model, tmp_path / "plain", ["q_proj", "v_proj"], seed=2)
    with pytest.raises(AdapterError, match="token embeddings"):
        merge(model, [plain, tokens])


def test_3_a_saved_module_before_an_adapted_one_is_refused(tmp_path):
    model = build_tiny("mlp")
    adapters = [make_lora(model, tmp_path / f"m{i}", ["0", "4"], seed=i + 1, modules_to_save=["2"]) for i in range(2)]
    with pytest.raises(AdapterError, match="module 2 is saved whole.*comes before"):
        merge(model, adapters)


def test_3_the_export_names_the_task_type_the_adapters_agree_on(tmp_path):
    model = build_tiny("llama")
    adapters = [make_lora(model, tmp_path / f"a{i}", ["q_proj"], seed=i + 1, task_type="CAUSAL_LM") for i in range(2)]
    merge(model, adapters).save_adapter(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"


# -- 4. tied or shared weights --------------------------------------------------------------------------------

def test_4_tied_lm_head_is_refused_by_apply_to_and_untie_matches_the_adapter(tmp_path):
    from peft import PeftModel

    model = build_tiny("llama")
    model.lm_head.weight = model.model.embed_tokens.weight
    model.config.tie_word_embeddings = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapters = [make_lora(model, tmp_path / f"t{i}", ["q_proj", "lm_head"], seed=i + 1) for i in range(2)]
    result = merge(model, adapters)
    with pytest.raises(ExportError, match="lm_head shares its weight with model.embed_tokens.*untie=True"):
        result.apply_to(copy.deepcopy(model))
    untied = result.apply_to(copy.deepcopy(model), untie=True)
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight
    assert torch.equal(untied.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert untied.config.tie_word_embeddings is False
    result.save_adapter(tmp_path / "merged")
    batch = token_batches("llama", seed=7)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "merged"))
    assert torch.allclose(outputs(untied, batch), outputs(loaded, batch), atol=1e-4)


def test_4_two_linears_sharing_one_parameter_are_refused_by_apply_to_unless_untied(tmp_path):
    model = build_tiny("mlp")
    shared = torch.nn.Sequential(model[0], model[1], model[2], torch.nn.ReLU(), torch.nn.Linear(16, 16), model[3],
                                 model[4])
    shared[4].weight = shared[2].weight
    adapters = [make_lora(shared, tmp_path / f"s{i}", ["2", "4"], seed=i + 1) for i in range(2)]
    result = merge(shared, adapters)
    with pytest.raises(ExportError, match="module 2 shares its weight with 4.weight"):
        result.apply_to(copy.deepcopy(shared))
    dense = result.apply_to(copy.deepcopy(shared), untie=True)
    x = torch.randn(5, 8)
    expected = copy.deepcopy(shared)
    with torch.no_grad():
        expected[2].weight = torch.nn.Parameter(shared[2].weight + result.deltas["2"])
        expected[4].weight = torch.nn.Parameter(shared[4].weight + result.deltas["4"])
    assert torch.allclose(dense(x), expected(x), atol=1e-5)


# -- 5. overwrite is atomic ----------------------------------------------------------------------------------

def _adapter_bytes(folder: Path):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())} if folder.is_dir() else None


def test_5_a_kill_at_any_step_leaves_the_old_or_the_new_adapter(case, tmp_path, monkeypatch):
    out = tmp_path / "out" / "merged"
    merge(case.model, case.adapters).save_adapter(out)
    old = _adapter_bytes(out)
    snapshots = []
    real_rename = export._rename

    def rename_and_snapshot(source, destination):
        snapshots.append(_copy(out.parent, tmp_path / f"snap{len(snapshots)}a"))  # killed before this step
        real_rename(source, destination)
        snapshots.append(_copy(out.parent, tmp_path / f"snap{len(snapshots)}b"))  # killed right after it

    monkeypatch.setattr(export, "_rename", rename_and_snapshot)
    merge(case.model, case.adapters, method="task_arithmetic").save_adapter(out, overwrite=True)
    new = _adapter_bytes(out)
    assert new != old and len(snapshots) == 4
    monkeypatch.setattr(export, "_rename", real_rename)
    for snapshot in snapshots:  # what a kill at that moment leaves; the next write to the target recovers it
        target = snapshot / "merged"
        export.recover(target)
        assert _adapter_bytes(target) in (old, new), snapshot.name
        assert [p.name for p in snapshot.iterdir()] == ["merged"]  # no staging folder, no old copy left


def _copy(folder: Path, to: Path) -> Path:
    shutil.copytree(folder, to)
    return to


def test_5_a_failed_rename_keeps_the_old_adapter_and_no_staging_folder(case, tmp_path, monkeypatch):
    out = tmp_path / "merged"
    merge(case.model, case.adapters).save_adapter(out)
    old = _adapter_bytes(out)
    real_rename = export._rename

    def fail_into_place(source, destination):
        if Path(destination) == out and export.STAGING in Path(source).name:
            raise OSError("rename failed")
        real_rename(source, destination)

    monkeypatch.setattr(export, "_rename", fail_into_place)
    with pytest.raises(OSError, match="rename failed"):
        merge(case.model, case.adapters, method="task_arithmetic").save_adapter(out, overwrite=True)
    assert _adapter_bytes(out) == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case", "merged"]


def test_5_stale_staging_folders_of_a_killed_run_are_removed_by_the_next_write(case, tmp_path):
    stale = tmp_path / f".merged{export.STAGING}abc123"
    stale.mkdir()
    (stale / "adapter_model.safetensors").write_bytes(b"x" * 1000)
    merge(case.model, case.adapters).save_adapter(tmp_path / "merged")
    assert not stale.exists()


# -- 6. NaN / Inf ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["iteris", "linear", "ties"])
def test_6_nan_in_an_adapter_is_refused_naming_the_module(case, method):
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    rewrite(case.adapters[1], tensors={key: lambda t: t.index_put((torch.tensor([0]), torch.tensor([0])),
                                                                    torch.tensor(float("nan")))})
    with pytest.raises(AdapterError, match="task_1: module model.layers.1.self_attn.v_proj: lora_B contains NaN"):
        merge(case.model, case.adapters, case.calibration, method=method)


def test_6_nan_in_the_base_weight_is_refused_naming_the_parameter(case):
    with torch.no_grad():
        case.model.model.layers[1].self_attn.v_proj.weight[0, 0] = float("inf")
    with pytest.raises(AdapterError, match=r"parameter model\.layers\.1\.self_attn\.v_proj\.weight contains NaN or Inf"):
        merge(case.model, case.adapters, case.calibration, method="iteris")


def test_6_a_non_finite_merge_is_never_written(case, tmp_path):
    result = merge(case.model, case.adapters)
    name = next(iter(result.factors))
    B, A = result.factors[name]
    result.factors[name] = (B, A * float("nan"))
    with pytest.raises(ExportError, match=f"{name}.lora_A.weight: the merged adapter contains NaN"):
        result.save_adapter(tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case"]


# -- 8. messages of the Python API -------------------------------------------------------------------------------

@pytest.mark.parametrize("config, match", [
    (["not", "a", "dict"], "holds a list, not a JSON object"),
    ({"peft_type": "LORA", "lora_alpha": "8"}, "lora_alpha .* '8'; it must be a finite number"),
    ({"peft_type": "LORA", "lora_alpha": 8, "alpha_pattern": {"q_proj": "x"}}, "alpha_pattern .* numbers")])
def test_8_bad_adapter_configs_are_refused_naming_the_field(case, tmp_path, config, match):
    odd = tmp_path / "odd"
    shutil.copytree(case.adapters[1], odd)
    (odd / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match=match):
        merge(case.model, [case.adapters[0], str(odd)])


@pytest.mark.parametrize("as_", [str, Path])
def test_8_a_single_path_instead_of_a_list_is_refused_with_the_fix(case, as_):
    with pytest.raises(AdapterError, match="list of adapter folders.*Pass adapters=\\[folder_a, folder_b\\]"):
        merge(case.model, as_(case.adapters[0]))


def test_8_dataloader_batches_of_one_tensor_are_accepted(tmp_path):
    from torch.utils.data import DataLoader, TensorDataset

    mlp = merge_case("mlp", tmp_path, n_tasks=2)
    loaders = [DataLoader(TensorDataset(torch.cat(c)), batch_size=3) for c in mlp.calibration]
    assert isinstance(next(iter(loaders[0])), list)
    via_loader = merge(mlp.model, mlp.adapters, loaders, method="iteris", schedule="jacobi", max_iter=2)
    via_tensors = merge(mlp.model, mlp.adapters, mlp.calibration, method="iteris", schedule="jacobi", max_iter=2)
    for name in via_tensors.deltas:
        assert torch.allclose(via_loader.deltas[name], via_tensors.deltas[name], atol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    ({"alpha": float("inf")}, "alpha must be a finite number"), ({"alpha": float("nan")}, "alpha must be a finite"),
    ({"alpha": "1e-4"}, "alpha must be a finite number"),
    ({"weights": [1.0, -1.0]}, "must be >= 0.*task_arithmetic"), ({"weights": [float("nan"), 1.0]}, "finite"),
    ({"weights": [0.0, 0.0]}, "all weights are 0"), ({"weights": "11"}, "list of numbers, one per adapter")])
def test_8_bad_alpha_and_weights_are_refused(case, kwargs, match):
    with pytest.raises(IterisError, match=match):
        merge(case.model, case.adapters, case.calibration, method="iteris", **kwargs)


def test_8_all_zero_weights_are_refused_for_data_free_methods_and_negative_ones_allowed(case):
    with pytest.raises(IterisError, match="all weights are 0"):
        merge(case.model, case.adapters, method="task_arithmetic", weights=[0, 0])
    negated = merge(case.model, case.adapters, method="task_arithmetic", weights=[1.0, -1.0])
    assert all(d.abs().max() > 0 for d in negated.deltas.values())


def test_8_adapters_of_different_base_models_merge_with_a_warning(case):
    rewrite(case.adapters[0], config={"base_model_name_or_path": "org/model-a"})
    rewrite(case.adapters[1], config={"base_model_name_or_path": "org/model-b"})
    with pytest.warns(UserWarning, match="different base models.*org/model-a.*org/model-b"):
        result = merge(case.model, case.adapters)
    assert result.deltas
