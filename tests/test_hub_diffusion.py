"""The Stable Diffusion hub recipe end to end on a tiny random pipeline saved to tmp_path (loaded through the same
from_pretrained code as a hub id), with a fake image source in place of the hub datasets."""
import json
from dataclasses import replace
import runpy
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import tiny_diffusion as td
from iteris_lab.lora_formats import read_diffusers_lora
from iteris_lab.measure import weights_added
from iteris_lab.merge import merge_loras
from iteris_lab.profiles import PROFILES
from iteris_lab.tracks.hub.diffusion import (CONCEPTS, SDHubConfig, calibration, encode_images, run_sd_hub,
                                             sd_hub_config, to_pixels)

METHODS = ("linear", "ties", "iteris")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fake_images(concept):
    """Three seeded random RGB images per concept, of odd sizes (the crop has work to do)."""
    generator = torch.Generator().manual_seed(len(concept.name))
    return [Image.fromarray((torch.rand(20, 26, 3, generator=generator) * 255).byte().numpy()) for _ in range(3)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd_hub")
    td.tiny_pipeline(root / "pipe")
    pipe = td.load_pipeline(root / "pipe")
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    config = sd_hub_config(PROFILES["ci"], model=str(root / "pipe"), resolution=16, methods=METHODS, conv=True,
                           lr=1e-2, clip_model=td.tiny_clip(root / "clip"), device="cpu")  # lr: LoRAs that matter
    report = run_sd_hub(config, root / "out", images=fake_images, pipe=pipe)
    return root, pipe, before, config, report


def test_profiles_size_the_run():
    gpu, ci = sd_hub_config(PROFILES["gpu"]), sd_hub_config(PROFILES["ci"], rank=4)
    assert gpu.model == "stable-diffusion-v1-5/stable-diffusion-v1-5" and gpu.max_iter == 10
    assert ci.train_steps < gpu.train_steps and ci.rank == 4
    assert [c.source for c in gpu.concepts] == ["diffusers/dog-example", "diffusers/cat_toy_example"]
    assert gpu.sample_prompts()[-1] == "a photo of sks dog and zwx toy"


def test_report_schema_and_files(run):
    root, _, _, config, report = run
    out = root / "out"
    assert json.loads((out / "sd_hub_results.json").read_text())["model"] == config.model
    assert [r["label"] for r in report["references"]] == ["base", "lora:dog", "lora:cat_toy"]
    assert [r["method"] for r in report["results"]] == list(METHODS)
    for row in report["references"] + report["results"]:
        assert (out / row["grid"]).is_file() and row["sample_seconds"] > 0
    for row in report["results"]:
        assert (out / row["lora_file"]).is_file() and row["merge_seconds"] >= 0
    for row in report["references"] + report["results"]:  # CLIP-T per prompt, CLIP-I per concept it names
        scores = row["scores"]
        assert list(scores) == report["prompts"] and all(-1 <= s["clip_t"] <= 1 for s in scores.values())
        assert [list(s["clip_i"]) for s in scores.values()] == [["dog"], ["cat_toy"], ["dog", "cat_toy"]]
    iteris = report["results"][-1]
    assert len(iteris["objective"]) == config.max_iter and iteris["export_max_relative_error"] == 0.0
    assert iteris["export_rank"] == 2 * config.rank  # exact factors, rank Σ r_i
    for name, recipe in report["adapters"].items():
        assert recipe["trained"] and recipe["class_images"] == config.class_images
        assert (out / "adapters" / name / "pytorch_lora_weights.safetensors").is_file()
    assert len(list((out / "class_images" / "dog").glob("*.png"))) == config.class_images


def test_base_weights_unchanged_and_no_adapters_left(run):
    _, pipe, before, _, _ = run
    after = pipe.unet.state_dict()
    assert set(after) == set(before)  # no lora_A / lora_B left behind
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_merged_file_is_the_iteris_merge_and_loads_with_load_lora_weights(run):
    """Redo the IterIS merge from the saved LoRAs and the same calibration; the written file, loaded by
    diffusers, gives the UNet output of W0 + that merge's ΔW."""
    root, _, _, config, report = run
    pipe = td.load_pipeline(root / "pipe")
    adapters = [read_diffusers_lora(root / "out" / "adapters" / c.name, pipe.unet) for c in config.concepts]
    batches = [calibration(pipe, c, encode_images(pipe, to_pixels(fake_images(c), config.resolution)), config)
               for c in config.concepts]
    result = merge_loras(pipe.unet, adapters, batches, method="iteris", schedule="jacobi", max_iter=config.max_iter,
                         alpha=config.alpha,
                         seed=config.seed, progress=False)
    batch = td.unet_batch(pipe.unet, tokens=77)
    base = td.unet_output(pipe.unet, batch)
    file = root / "out" / report["results"][-1]["lora_file"]
    with weights_added(pipe.unet, result.deltas):
        expected = td.unet_output(pipe.unet, batch)
    pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name="merged")
    loaded = td.unet_output(pipe.unet, batch)
    assert (loaded - base).abs().max() > 0.05
    torch.testing.assert_close(loaded, expected, atol=2e-5, rtol=0)


def test_calibration_batches_have_no_mask_and_every_timestep(run):
    root, pipe, _, config, _ = run
    concept = CONCEPTS[0]
    latents = encode_images(pipe, to_pixels(fake_images(concept), config.resolution))
    assert latents.shape == (3, 4, 8, 8)
    batches = calibration(pipe, concept, latents, config)
    timesteps = torch.cat([b["timestep"] for b in batches])
    assert sorted(set(timesteps.tolist())) == sorted(config.calibration_timesteps)
    assert len(timesteps) == config.calibration_images * len(config.calibration_timesteps)
    assert all(set(b) == {"sample", "timestep", "encoder_hidden_states"} for b in batches)
    assert batches[0]["encoder_hidden_states"].shape[1:] == (77, td.CROSS_DIM)


def test_existing_loras_are_reused(run):
    root, pipe, _, config, _ = run
    again = run_sd_hub(replace(config, methods=("linear",), clip_model=None), root / "out",
                       images=fake_images, pipe=pipe)
    assert not any(recipe["trained"] for recipe in again["adapters"].values())
    assert again["references"][0]["scores"] == {}  # no CLIP model: images and timings only


def test_benchmark_script_parses(monkeypatch):
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "hub_diffusion.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(script), run_name="__main__")
    assert exit_info.value.code == 0
    assert isinstance(SDHubConfig(), SDHubConfig)


def test_hub_images_reads_the_dataset_snapshot(tmp_path, monkeypatch):
    """hub_images downloads the dataset repo (here: a local folder standing in for snapshot_download) and opens
    its image files in name order as RGB."""
    import huggingface_hub

    from iteris_lab.tracks.hub.diffusion import hub_images

    for name, mode in (("b.png", "L"), ("a.jpg", "RGB")):
        Image.new(mode, (12, 9)).save(tmp_path / name)
    (tmp_path / "README.md").write_text("not an image")
    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo, **kwargs: calls.append((repo, kwargs["repo_type"])) or str(tmp_path))
    images = hub_images(CONCEPTS[0])
    assert calls == [("diffusers/dog-example", "dataset")]
    assert [im.mode for im in images] == ["RGB", "RGB"] and images[1].size == (12, 9)
    assert to_pixels(images, 8).shape == (2, 3, 8, 8)
