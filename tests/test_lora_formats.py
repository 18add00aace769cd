"""diffusers / kohya LoRA files <-> LoraAdapter, on a tiny UNet2DConditionModel with attention AND conv LoRAs.

The reference for "the right ΔW" is always what diffusers itself applies when it loads the file (peft layers),
compared on the UNet's output against W0 + ΔW written by iteris_lab.measure.weights_added."""
import copy
import re

import pytest
import torch
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

import tiny_diffusion as td
from iteris_lab.io.peft import load_adapter
from iteris_lab.errors import AdapterError
from iteris_lab.lora_formats import (kohya_names, load_lora, read_diffusers_lora, read_kohya_lora,
                                     write_diffusers_lora)
from iteris_lab.measure import weights_added
from iteris_lab.merge import merge_loras

ATOL = 5e-5  # float32: adding B·A inside the layer vs into the weight
KOHYA_TARGETS = r"(to_q|to_k|to_v|to_out\.0|conv1|conv2|proj_in|proj_out|ff\.net\.0\.proj|ff\.net\.2|time_emb_proj)$"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def base():
    return td.tiny_unet()


@pytest.fixture
def batch(base):
    return td.unet_batch(base)


def _with_lora(base, name="a", seed=1, **kwargs):
    unet = copy.deepcopy(base)
    td.add_lora(unet, name, seed=seed, **kwargs)
    return unet


def _diffusers_applied(base, file, batch, network_alphas=None):
    """The UNet output with `file` loaded by diffusers (pipeline loader: kohya conversion, prefix "unet")."""
    from diffusers import StableDiffusionPipeline

    state, alphas = StableDiffusionPipeline.lora_state_dict(str(file))
    unet = copy.deepcopy(base)
    StableDiffusionPipeline.load_lora_into_unet(state, alphas, unet, adapter_name="check")
    return td.unet_output(unet, batch)


def _added(base, layers, batch):
    with weights_added(base, layers):
        return td.unet_output(base, batch)


def test_save_lora_adapter_file_reads_to_the_live_lora(base, batch, tmp_path):
    unet = _with_lora(base, rank=2, alpha=4, alpha_pattern={"conv1": 3}, rank_pattern={"conv2": 3})
    live = td.unet_output(unet, batch)
    unet.save_lora_adapter(str(tmp_path / "a"), adapter_name="a")
    adapter = read_diffusers_lora(tmp_path / "a", base)
    assert len(adapter.layers) == 32 + 16  # 4 transformer blocks x 2 attentions x 4 projections; 8 resnets x 2
    assert {layer.scale for layer in adapter.layers.values()} == {2.0, 1.5, 4 / 3}
    conv = adapter.layers["down_blocks.0.resnets.0.conv2"]
    assert conv.A.shape == (3, 8, 3, 3) and conv.B.shape == (8, 3, 1, 1)
    assert (live - td.unet_output(base, batch)).abs().max() > 0.1  # the LoRA does something
    torch.testing.assert_close(_added(base, adapter.layers, batch), live, atol=ATOL, rtol=0)


def test_pipeline_file_without_metadata_has_scale_one_as_diffusers_loads_it(base, batch, tmp_path):
    from diffusers import StableDiffusionPipeline

    unet = _with_lora(base, rank=2, alpha=4)
    layers = get_peft_model_state_dict(unet, adapter_name="a")
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=layers)
    adapter = read_diffusers_lora(tmp_path / "pytorch_lora_weights.safetensors", base)
    assert {layer.scale for layer in adapter.layers.values()} == {1.0}
    expected = _diffusers_applied(base, tmp_path / "pytorch_lora_weights.safetensors", batch)
    torch.testing.assert_close(_added(base, adapter.layers, batch), expected, atol=ATOL, rtol=0)


def test_pipeline_file_with_metadata_keeps_alpha(base, batch, tmp_path):
    from diffusers import StableDiffusionPipeline

    unet = _with_lora(base, rank=2, alpha=4, conv=False)
    layers = get_peft_model_state_dict(unet, adapter_name="a")
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=layers,
                                              unet_lora_adapter_metadata=unet.peft_config["a"].to_dict())
    adapter = load_lora(tmp_path, base)
    assert adapter.config["format"] == "diffusers" and adapter.config["scale_from"] == "metadata"
    assert all(key.startswith("unet.") for key in load_file(tmp_path / "pytorch_lora_weights.safetensors"))
    torch.testing.assert_close(_added(base, adapter.layers, batch), td.unet_output(unet, batch), atol=ATOL, rtol=0)


def test_old_style_keys_and_alpha_tensors(base, batch, tmp_path):
    """lora.down/up and processor.to_q_lora names with "<module>.alpha" tensors read as the peft-named file."""
    unet = _with_lora(base, rank=2, alpha=4)
    old = {}
    for key, tensor in get_peft_model_state_dict(unet, adapter_name="a").items():
        module, which = re.match(r"(.+)\.lora_(A|B)\.weight", key).groups()
        down_up = "down" if which == "A" else "up"
        attn = re.match(r"(.+\.attn[12])\.(to_q|to_k|to_v|to_out)(\.0)?$", module)
        name = f"{attn[1]}.processor.{attn[2]}_lora.{down_up}.weight" if attn else f"{module}.lora.{down_up}.weight"
        old[f"unet.{name}"] = tensor
        old[f"unet.{module}.alpha"] = torch.tensor(4.0)
    save_file(old, str(tmp_path / "old.safetensors"))
    adapter = read_diffusers_lora(tmp_path / "old.safetensors", base)
    assert sorted(adapter.layers) == sorted(read_diffusers_lora(_saved(unet, tmp_path), base).layers)
    torch.testing.assert_close(_added(base, adapter.layers, batch), td.unet_output(unet, batch), atol=ATOL, rtol=0)


def _saved(unet, tmp_path, name="a"):
    unet.save_lora_adapter(str(tmp_path / name), adapter_name=name)
    return tmp_path / name / "pytorch_lora_weights.safetensors"


def _kohya_file(base, path, seed=0):
    """A kohya file on every attention, feed-forward, projection, time-embedding and resnet conv of `base`, ranks 2
    or 3, network alpha 1 on Linear layers and conv alpha 3 on Conv2d layers (as sd-scripts writes them)."""
    generator, state, expected = torch.Generator().manual_seed(seed), {}, {}
    targets = [(n, m) for n, m in base.named_modules() if re.search(KOHYA_TARGETS, n)]
    for i, (name, module) in enumerate(targets):
        rank, flat = 2 + i % 2, "lora_unet_" + name.replace(".", "_")
        conv = isinstance(module, torch.nn.Conv2d)
        down = (rank, *module.weight.shape[1:]) if conv else (rank, module.in_features)
        up = (module.weight.shape[0], rank, 1, 1) if conv else (module.out_features, rank)
        state[flat + ".lora_down.weight"] = 0.3 * torch.randn(down, generator=generator)
        state[flat + ".lora_up.weight"] = 0.3 * torch.randn(up, generator=generator)
        state[flat + ".alpha"] = torch.tensor(3.0 if conv else 1.0)
        expected[name] = (3.0 if conv else 1.0) / rank
    save_file(state, str(path))
    return expected


def test_kohya_file_maps_names_and_matches_diffusers(base, batch, tmp_path):
    scales = _kohya_file(base, tmp_path / "k.safetensors")
    adapter = read_kohya_lora(tmp_path / "k.safetensors", base)
    assert set(adapter.layers) == set(scales)  # names with to_q, proj_in, transformer_blocks, to_out.0 intact
    assert {n: layer.scale for n, layer in adapter.layers.items()} == pytest.approx(scales)
    assert any(layer.A.dim() == 4 and layer.A.shape[-1] == 3 for layer in adapter.layers.values())  # conv LoRA
    expected = _diffusers_applied(base, tmp_path / "k.safetensors", batch)
    assert (expected - td.unet_output(base, batch)).abs().max() > 0.1
    torch.testing.assert_close(_added(base, adapter.layers, batch), expected, atol=ATOL, rtol=0)
    assert load_lora(tmp_path / "k.safetensors", base).config["format"] == "kohya"


def test_kohya_names_are_unique_and_reversible(base):
    names = kohya_names(base)
    assert names["down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_out_0"] == \
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0"
    assert all(flat == name.replace(".", "_") for flat, name in names.items())


def _merge(base, tmp_path, batch, method="iteris"):
    adapters = [read_diffusers_lora(_saved(_with_lora(base, n, seed=s, rank=2, alpha=4), tmp_path, n), base)
                for n, s in (("a", 1), ("b", 2))]
    calibration = [[td.unet_batch(base, seed=s)] for s in (3, 4)]
    return merge_loras(base, adapters, calibration, method=method, schedule="jacobi", max_iter=2, alpha=1e-3,
                       progress=False)


@pytest.mark.parametrize("method, rank", [("iteris", None), ("ties", None), ("iteris", 1)])
def test_written_merge_loads_with_load_lora_weights(tmp_path, method, rank):
    pipe = td.tiny_pipeline(tmp_path / "pipe")
    base, batch = pipe.unet, td.unet_batch(pipe.unet)
    result = _merge(base, tmp_path, batch, method)
    report = write_diffusers_lora(result, tmp_path / "merged", rank=rank)
    assert report.path.endswith("merged/pytorch_lora_weights.safetensors")
    ranks = set(report.ranks.values())
    if rank is None and method == "iteris":
        assert ranks == {4} and report.max_relative_error == 0.0  # exact factors, rank Σ r_i
    if method == "ties":
        assert len(ranks) > 1  # numerical ranks differ: rank_pattern / alpha_pattern in the metadata
    expected = _added(base, result.deltas, batch) if rank is None else None
    approx = {n: (B.double() @ A.double().reshape(A.shape[0], -1)) for n, (B, A) in _factors(report.path).items()}
    pipe.load_lora_weights(str(tmp_path / "merged"), weight_name="pytorch_lora_weights.safetensors",
                           adapter_name="merged")
    loaded = td.unet_output(pipe.unet, batch)
    pipe.unload_lora_weights()
    torch.testing.assert_close(td.unet_output(pipe.unet, batch), _added(base, {}, batch))
    if expected is None:  # truncated: diffusers applies exactly the written B·A
        expected = _added(base, approx, batch)
    torch.testing.assert_close(loaded, expected, atol=1e-4, rtol=0)  # float32 SVD factors
    reread = read_diffusers_lora(report.path, base)
    assert {layer.scale for layer in reread.layers.values()} == {1.0}


def test_written_merge_matches_apply_to(tmp_path, base, batch):
    result = _merge(base, tmp_path, batch)
    report = write_diffusers_lora(result, tmp_path / "m.safetensors", prefix=None)
    expected = td.unet_output(result.apply_to(copy.deepcopy(base)), batch)
    unet = copy.deepcopy(base)
    unet.load_lora_adapter(report.path, prefix=None, adapter_name="m")
    torch.testing.assert_close(td.unet_output(unet, batch), expected, atol=ATOL, rtol=0)


def _factors(file):
    state = load_file(file)
    names = {k[len("unet."):-len(".lora_A.weight")] for k in state if k.endswith(".lora_A.weight")}
    return {n: (state[f"unet.{n}.lora_B.weight"].reshape(state[f"unet.{n}.lora_B.weight"].shape[0], -1),
                state[f"unet.{n}.lora_A.weight"]) for n in names}


def test_text_encoder_part_is_read_separately(tmp_path, base):
    pipe = td.tiny_pipeline()
    te_module = "text_model.encoder.layers.0.self_attn.q_proj"
    unet_module = "mid_block.attentions.0.transformer_blocks.0.attn2.to_k"
    state = {f"text_encoder.{te_module}.lora_A.weight": torch.randn(2, 32),
             f"text_encoder.{te_module}.lora_B.weight": torch.randn(32, 2),
             f"unet.{unet_module}.lora_A.weight": torch.randn(2, 32),
             f"unet.{unet_module}.lora_B.weight": torch.randn(16, 2)}
    save_file(state, str(tmp_path / "both.safetensors"))
    with pytest.raises(AdapterError, match="also holds a LoRA for text_encoder"):
        read_diffusers_lora(tmp_path / "both.safetensors", base)
    assert list(read_diffusers_lora(tmp_path / "both.safetensors", base, ignore_other=True).layers) == [unet_module]
    text = read_diffusers_lora(tmp_path / "both.safetensors", pipe.text_encoder, component="text_encoder",
                               ignore_other=True)
    own_name = "encoder.layers.0.self_attn.q_proj"  # transformers 5's CLIPTextModel has no text_model level
    assert list(text.layers) == [own_name]
    kohya = {"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.randn(2, 32),
             "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.randn(32, 2),
             "lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.randn(2, 16, 1, 1),
             "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": torch.randn(16, 2, 1, 1)}
    save_file(kohya, str(tmp_path / "kohya_both.safetensors"))
    with pytest.raises(AdapterError, match="also holds a LoRA for text_encoder"):
        load_lora(tmp_path / "kohya_both.safetensors", base)
    assert list(load_lora(tmp_path / "kohya_both.safetensors", pipe.text_encoder, component="text_encoder",
                          ignore_other=True).layers) == [own_name]


def test_peft_folder_goes_through_load_adapter(tmp_path, base):
    from peft import get_peft_model

    model = get_peft_model(copy.deepcopy(base), td.lora_config(conv=False))
    model.save_pretrained(str(tmp_path / "peft"))
    assert set(load_lora(tmp_path / "peft").layers) == set(load_adapter(tmp_path / "peft").layers)


def test_bad_files_give_clear_errors(tmp_path, base):
    with pytest.raises(AdapterError, match="does not exist"):
        load_lora(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="no pytorch_lora_weights"):
        load_lora(tmp_path / "empty")
    (tmp_path / "corrupt.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(AdapterError, match="could not be read|not a readable"):
        load_lora(tmp_path / "corrupt.safetensors")
    module = "mid_block.resnets.0.conv1"
    cases = {
        "dora": ({f"unet.{module}.lora_A.weight": torch.zeros(2, 144), f"unet.{module}.dora_scale": torch.ones(16)},
                 "DoRA"),
        "half": ({f"unet.{module}.lora_A.weight": torch.zeros(2, 144)}, "not both down"),
        "foreign": ({"unet.no_such.block.lora_A.weight": torch.zeros(2, 4),
                     "unet.no_such.block.lora_B.weight": torch.zeros(4, 2)}, "not in UNet2DConditionModel"),
        "shape": ({f"unet.{module}.lora_A.weight": torch.zeros(2, 10),
                   f"unet.{module}.lora_B.weight": torch.zeros(16, 2)}, "module's weight is"),
        "kohya_unknown": ({"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.zeros(2, 16),
                           "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": torch.zeros(16, 2)},
                          "match no module"),
    }
    for name, (state, message) in cases.items():
        save_file(state, str(tmp_path / f"{name}.safetensors"))
        with pytest.raises(AdapterError, match=message):
            load_lora(tmp_path / f"{name}.safetensors", base)
    with pytest.raises(AdapterError, match="needs the model"):
        load_lora(tmp_path / "kohya_unknown.safetensors")
    with pytest.raises(AdapterError, match="kohya-format"):
        read_diffusers_lora(tmp_path / "kohya_unknown.safetensors")
