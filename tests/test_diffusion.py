"""The diffusion track: digits and their style metrics, calibration batches, and IterIS on a UNet with conv LoRAs."""
import json
import zlib

import pytest
import torch

from iteris_lab.io.peft import load_adapter
from iteris_lab.features import gram_pass
from iteris_lab.measure import weights_added
from iteris_lab.merge import merge_loras
from iteris_lab.targets import Target
from iteris_lab.tracks.diffusion import diffusion as dm
from tiny_diffusion import TINY_UNET, pixel_unet_and_loras, pixel_unet_batches
from iteris_lab.tracks.diffusion.benchmark import concept_scores, prompts_for
from iteris_lab.tracks.diffusion.digits import digit_images, fit_judge, ink, slant, slant_score, split_indices, thicken


def test_style_metrics_measure_their_style():
    images, labels = digit_images(16)
    assert images.shape == (1797, 1, 16, 16) and 0 <= images.min() and images.max() <= 1
    assert ink(thicken(images)).mean() > ink(images).mean() + 0.15
    assert abs(float(slant_score(images).mean())) < 0.1
    assert float(slant_score(slant(images, 0.45)).mean()) > 0.3
    assert float(slant_score(slant(images, -0.45)).mean()) < -0.3


def test_split_is_seeded_stratified_and_disjoint():
    _, labels = digit_images(8)
    train, test = split_indices(labels, n_test=300, seed=0)
    again, _ = split_indices(labels, n_test=300, seed=0)
    other, _ = split_indices(labels, n_test=300, seed=1)
    assert torch.equal(train, again) and not torch.equal(train, other)
    assert set(train.tolist()).isdisjoint(test.tolist()) and len(train) + len(test) == len(labels)
    assert torch.bincount(labels[test]).tolist() == [30] * 10


def test_judge_reads_every_style():
    judge = fit_judge(16)
    assert set(judge.held_out) == {"plain", "thick", "slant", "thick+slant"}
    assert min(judge.held_out.values()) > 0.9
    with pytest.raises(ValueError, match="16x16"):
        judge.predict(torch.zeros(2, 1, 8, 8))


def test_prompts_name_digit_and_concepts():
    prompts, digits = prompts_for(("thick", "slant"), 12)
    assert digits.tolist() == list(range(10)) + [0, 1]
    assert "seven" in prompts[7] and "vxq" in prompts[7] and "bkz" in prompts[7]
    assert prompts[0] != prompts[10]  # the template changes after every ten digits


def test_noisy_batches_cover_every_pair_with_seeded_noise():
    images, cond, mask = torch.zeros(3, 1, 8, 8), torch.randn(3, 5, 12), torch.ones(3, 5, dtype=torch.long)
    batches = dm.noisy_batches(images, cond, mask, timesteps=(10, 500), batch_size=4, seed=0)
    assert [len(b["sample"]) for b in batches] == [4, 2]
    assert torch.cat([b["timestep"] for b in batches]).tolist() == [10, 10, 10, 500, 500, 500]
    again = dm.noisy_batches(images, cond, mask, timesteps=(10, 500), batch_size=4, seed=0)
    assert torch.equal(batches[0]["sample"], again[0]["sample"])
    noisy = torch.cat([b["sample"] for b in batches])
    assert noisy[:3].std() < noisy[3:].std()  # more noise at the later timestep
    with pytest.raises(ValueError, match="disagree"):
        dm.noisy_batches(images, cond[:2], mask)


def test_concept_scores_place_base_at_zero_and_lora_at_one():
    base = {s: {"ink": 0.3, "slant_score": 0.0} for s in ("both", "thick", "slant", "plain")}
    own = {"thick": {**base, "thick": {"ink": 0.5, "slant_score": 0.0}},
           "slant": {**base, "slant": {"ink": 0.3, "slant_score": 0.4}}}
    merged = {"both": {"ink": 0.4, "slant_score": 0.4}, "thick": {"ink": 0.5, "slant_score": 0.1},
              "slant": {"ink": 0.35, "slant_score": 0.2}, "plain": {"ink": 0.3, "slant_score": 0.0}}
    scores = concept_scores(merged, base, own)
    assert scores["fidelity"] == pytest.approx({"thick": 0.5, "slant": 1.0})
    assert scores["alone"] == pytest.approx({"thick": 1.0, "slant": 0.5})
    assert scores["leakage"] == pytest.approx({"thick": 0.25, "slant": 0.25})


def test_unet_loras_load_with_conv_layers(tmp_path):
    unet, dirs = pixel_unet_and_loras(tmp_path)
    adapter = load_adapter(dirs[0])
    convs = [n for n, layer in adapter.layers.items() if layer.A.dim() == 4]
    assert convs and all(n.endswith(("conv1", "conv2")) for n in convs)
    assert any(n.endswith("attn2.to_k") for n in adapter.layers)


def test_cross_attention_rows_are_the_real_text_tokens(tmp_path):
    unet, dirs = pixel_unet_and_loras(tmp_path)
    modules = dict(unet.named_modules())
    names = [n for n in modules if n.endswith(("attn2.to_k", "attn2.to_v", "attn1.to_q"))]
    grams = gram_pass(unet, {n: Target(n, modules[n]) for n in names}, pixel_unet_batches(0))
    rows = {group[0].rsplit(".", 1)[-1]: count for group, count in grams.rows.items()}
    assert rows["to_k"] == 2 * (3 + 5)  # two timesteps x real tokens; padding never enters
    assert rows["to_q"] == 2 * 2 * 4 * 4  # two timesteps x two images x the 4x4 latent positions


def test_iteris_on_a_unet_reports_every_iteration_and_leaves_it_unchanged(tmp_path):
    unet, dirs = pixel_unet_and_loras(tmp_path)
    before = {n: p.clone() for n, p in unet.state_dict().items()}
    seen = []
    result = merge_loras(unet, dirs, [pixel_unet_batches(1), pixel_unet_batches(2)], schedule="jacobi", max_iter=3,
                         progress=False,
                         on_iteration=lambda record, deltas: seen.append((record.iteration, deltas)))
    assert all(torch.equal(before[n], p) for n, p in unet.state_dict().items())
    assert [t for t, _ in seen] == [1, 2, 3]
    two = merge_loras(unet, dirs, [pixel_unet_batches(1), pixel_unet_batches(2)], schedule="jacobi", max_iter=2,
                      progress=False)
    for name, delta in two.deltas.items():
        torch.testing.assert_close(seen[1][1][name], delta)
    conv = next(n for n in result.deltas if n.endswith("conv1"))
    assert result.deltas[conv].shape == dict(unet.named_modules())[conv].weight.shape
    assert seen[0][1][conv].abs().sum() > 0
    with weights_added(unet, result.deltas):
        pass
    assert all(torch.equal(before[n], p) for n, p in unet.state_dict().items())


def test_regmean_solves_with_a_dead_text_feature(tmp_path):
    unet, dirs = pixel_unet_and_loras(tmp_path)
    batches = [pixel_unet_batches(1), pixel_unet_batches(2)]
    for task in batches:
        for b in task:
            b["encoder_hidden_states"][..., 3] = 0.0  # a feature the text encoder never uses
    result = merge_loras(unet, dirs, batches, method="regmean", progress=False)
    to_k = next(n for n in result.deltas if n.endswith("attn2.to_k"))
    assert torch.isfinite(result.deltas[to_k]).all()
    assert result.deltas[to_k][:, 3].abs().max() == 0  # the minimum-norm answer on a direction with no data


def test_training_writes_loadable_base_and_concept_lora(tmp_path):
    from dataclasses import replace

    from iteris_lab.tracks.diffusion.training import BASE_RECIPE, LORA_RECIPE, train_base, train_concept_lora

    encoder = dm.TextEncoder()
    train_base(encoder, replace(BASE_RECIPE, steps=2, batch_size=8, warmup_steps=1), tmp_path / "base")
    unet = dm.load_base(tmp_path / "base")
    assert not any(p.requires_grad for p in unet.parameters())
    log = train_concept_lora(tmp_path / "base", "thick", encoder, tmp_path / "thick",
                             replace(LORA_RECIPE, steps=2, batch_size=8, warmup_steps=1))
    assert log["steps_done"] == 2
    adapter = load_adapter(tmp_path / "thick")
    assert len(adapter.layers) == 48  # 32 attention projections + 16 resnet convolutions
    recipe = json.loads((tmp_path / "thick" / "recipe.json").read_text())
    assert recipe["concept"]["phrase"] == "in vxq style" and recipe["recipe"]["prior_fraction"] == 0.5
    with pytest.raises(ValueError, match="unknown concept"):
        train_concept_lora(tmp_path / "base", "blurry", encoder, tmp_path / "x", replace(LORA_RECIPE, steps=1))
    with pytest.raises(FileNotFoundError, match="train_diffusion.py"):
        dm.load_base(tmp_path / "nowhere")


class _FakeEncoder:
    """Prompt -> a seeded (T, 12) embedding: the tiny UNet's cross-attention width, no MiniLM needed."""

    def __call__(self, prompts):
        cond = torch.stack([torch.randn(6, 12, generator=torch.Generator().manual_seed(zlib.crc32(p.encode())))
                            for p in prompts])
        return cond, torch.ones(len(prompts), 6, dtype=torch.long)


class _FakeJudge:
    def predict(self, images):  # reads "3" in bright images, "0" otherwise: some right, some wrong
        return torch.where(images.mean((1, 2, 3)) > 0.5, 3, 0)


def test_measure_returns_per_example_outcomes_that_average_to_the_scores():
    from iteris_lab.tracks.diffusion.benchmark import (DiffusionTrack, content_per_example, levels_per_example,
                                                       measure, summary_row)

    torch.manual_seed(0)
    unet = dm.build_unet({**TINY_UNET, "sample_size": 16}).eval().requires_grad_(False)
    track = DiffusionTrack(unet, _FakeEncoder(), _FakeJudge(), {"thick": "-", "slant": "-"})
    base = measure(unet, track, 6, steps=2)
    assert set(base) == {"both", "thick", "slant", "plain"}
    for values in base.values():
        per = values["per_example"]
        assert all(len(v) == 6 for v in per.values()) and set(per["content"]) <= {0.0, 1.0}
        assert all(sum(per[m]) / 6 == pytest.approx(values[m]) for m in ("content", "ink", "slant_score"))
    with torch.no_grad():  # two "LoRAs": the same UNet with shifted output biases, so the levels are not 0
        own = {}
        for c, shift in (("thick", 0.3), ("slant", -0.2)):
            unet.conv_out.bias += shift
            own[c] = measure(unet, track, 6, steps=2)
            unet.conv_out.bias -= shift
    row = summary_row("x", "x", own["thick"], base, own)
    levels = levels_per_example(own["thick"], base, own)
    for c in ("thick", "slant"):
        assert sum(levels[c]) / 6 == pytest.approx(row["fidelity"][c])
    assert sum(levels["mean"]) / 6 == pytest.approx(row["mean_fidelity"])
    assert sum(content_per_example(own["thick"])) / 6 == pytest.approx(row["content"])
