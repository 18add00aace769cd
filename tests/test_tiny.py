"""The test fixtures themselves: tiny models, adapters and batches behave as the engine tests assume."""
import copy

import pytest
import torch
from peft import PeftModel

from tiny import HF_KINDS, KINDS, PAD_ID, TARGETS, build_tiny, load_tiny, outputs, token_batches


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kind", KINDS)
def test_build_is_seeded_float32_eval(kind):
    a, b, c = build_tiny(kind, seed=0), build_tiny(kind, seed=0), build_tiny(kind, seed=1)
    assert not a.training
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in a.parameters())
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_build_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny("llama")
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("kind", HF_KINDS)
def test_token_batches_are_right_padded(kind):
    batches = token_batches(kind, n_batches=2, batch_size=3, seq_len=7)
    assert len(batches) == 2 and batches[0]["input_ids"].shape == (3, 7)
    for batch in batches:
        mask = batch["attention_mask"]
        lengths = mask.sum(1)
        assert (mask == 0).any() and len(set(lengths.tolist())) == 3
        # right padding: ones, then zeros
        assert torch.equal(mask, (torch.arange(7) < lengths[:, None]).long())
        assert (batch["input_ids"][mask == 0] == PAD_ID).all() and (batch["input_ids"][mask == 1] != PAD_ID).all()
    if kind == "t5":
        labels = batches[0]["labels"]
        assert labels.shape == (3, 9) and (labels == -100).any()
    assert not torch.equal(batches[0]["input_ids"], batches[1]["input_ids"])
    unpadded = token_batches(kind, pad=False)[0]
    assert (unpadded["attention_mask"] == 1).all()


def test_token_batches_have_the_requested_shapes():
    assert token_batches("mlp")[0].shape == (3, 8)
    assert token_batches("conv", n_batches=1, batch_size=2)[0].shape == (2, 3, 8, 8)


@pytest.mark.parametrize("kind", KINDS)
def test_lora_reloads_changes_outputs_and_spares_base(kind, lora_dir):
    model = build_tiny(kind)
    before = _state(model)
    path = lora_dir(model, TARGETS[kind], fan_in_fan_out=kind == "gpt2", seed=3)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any("lora" in name for name, _ in model.named_modules())

    batch = token_batches(kind)[0]
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), path).eval()
    base_out, lora_out = outputs(model, batch), outputs(peft_model, batch)
    assert torch.isfinite(lora_out).all()
    assert (lora_out - base_out).abs().max() > 1e-2 * base_out.abs().max()

    # every adapted layer carries ‖ΔW‖ = 0.1‖W0‖ with non-zero A and B
    layers = [m for m in peft_model.modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    assert layers
    for layer in layers:
        assert layer.lora_B["default"].weight.abs().min() > 0
        ratio = layer.get_delta_weight("default").norm() / layer.get_base_layer().weight.norm()
        assert ratio.item() == pytest.approx(0.1, rel=1e-4)


def test_lora_seed_rank_and_rslora(lora_dir):
    model = build_tiny("mlp")
    a = lora_dir(model, ["0", "2"], seed=0, r=2, lora_alpha=4, use_rslora=True)
    b = lora_dir(model, ["0", "2"], seed=0, r=2, lora_alpha=4, use_rslora=True)
    c = lora_dir(model, ["0", "2"], seed=1, r=2, lora_alpha=4, use_rslora=True)
    load = lambda p: PeftModel.from_pretrained(copy.deepcopy(model), p).base_model.model[0]  # noqa: E731
    la, lb, lc = load(a), load(b), load(c)
    assert la.lora_A["default"].weight.shape == (2, 8) and la.use_rslora["default"]
    assert torch.equal(la.lora_A["default"].weight, lb.lora_A["default"].weight)
    assert not torch.equal(la.lora_A["default"].weight, lc.lora_A["default"].weight)


@pytest.mark.parametrize("kind", HF_KINDS)
def test_save_tiny_round_trips(kind, tiny_dir):
    reloaded = load_tiny(kind, tiny_dir(kind, seed=2))
    model = build_tiny(kind, seed=2)
    batch = token_batches(kind)[0]
    torch.testing.assert_close(outputs(reloaded, batch), outputs(model, batch))
    assert not reloaded.training


def test_tiny_case_gives_distinct_task_loras_and_their_calibration(tiny_case):
    case = tiny_case("gpt2", n_tasks=3, targets=["c_attn"])
    assert len(case.adapters) == len(case.calibration) == 3 and len(set(case.adapters)) == 3
    outs = [outputs(PeftModel.from_pretrained(copy.deepcopy(case.model), p), case.calibration[0][0])
            for p in case.adapters]
    assert not torch.allclose(outs[0], outs[1])
