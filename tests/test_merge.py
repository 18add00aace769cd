"""merge_loras end to end on tiny models: RegMean equivalence, the fixed point, masks, architectures."""
import copy
import weakref

import pytest
import torch
from peft import PeftModel

import iteris_lab
from iteris_lab.plumbing.deltas import DeltaHooks
from iteris_lab.features import gram_pass
from iteris_lab.targets import Target
from tiny import TARGETS, build_tiny, merge_case, outputs, token_batches


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before):
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def lora_inputs(model, adapter, batches, module_names):
    """Independent feature collection: PEFT itself runs adapter i; hooks on the LoRA layers' base layers
    keep the rows at real positions (attention_mask), concatenated over batches. {name: (rows, in)}."""
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), adapter).eval()
    modules = dict(peft_model.base_model.model.named_modules())
    rows = {name: [] for name in module_names}
    current = {}

    def hook(name):
        def fn(module, args):
            x = args[0]
            if isinstance(current.get("batch"), dict):
                x = x[current["batch"]["attention_mask"].bool()]
            rows[name].append(x.reshape(-1, x.shape[-1]).double())
        return fn

    handles = [modules[name].base_layer.register_forward_pre_hook(hook(name)) for name in module_names]
    with torch.no_grad():
        for batch in batches:
            current["batch"] = batch
            outputs(peft_model, batch)
    for h in handles:
        h.remove()
    return {name: torch.cat(r) for name, r in rows.items()}


@pytest.mark.parametrize("kind", ["mlp", "llama"])
def test_one_solve_without_weights_or_alpha_is_regmean_by_an_independent_loop(tmp_path, kind):
    case = merge_case(kind, tmp_path, n_tasks=3)
    if kind == "mlp":  # enough rows for an unregularized solve
        case.calibration = [token_batches("mlp", n_batches=4, batch_size=8, seed=10 + i) for i in range(3)]
    else:
        case.calibration = [token_batches("llama", n_batches=6, batch_size=4, seq_len=9, seed=10 + i) for i in range(3)]
    result = iteris_lab.merge_loras(case.model, case.adapters, case.calibration, schedule="jacobi", max_iter=1,
                                    alpha=0.0,
                                    adaptive_weights="none", progress=False)
    adapters = [iteris_lab.load_adapter(a) for a in case.adapters]
    names = list(result.deltas)
    features = [lora_inputs(case.model, a, cal, names) for a, cal in zip(case.adapters, case.calibration)]
    for name in names:
        grams = [f[name].T @ f[name] for f in features]
        key = next(k for k in adapters[0].layers if name.endswith(k))
        numerator = sum(a.layers[key].delta() @ g for a, g in zip(adapters, grams))
        expected = torch.linalg.solve(sum(grams), numerator.T).T
        assert torch.allclose(result.deltas[name].double(), expected, rtol=1e-4, atol=1e-5), name


def test_chain_of_j_layers_reaches_its_fixed_point_after_j_solves(tmp_path):
    case = merge_case("mlp", tmp_path, n_tasks=3)  # a chain of J = 3 adapted Linear layers
    runs = {t: iteris_lab.merge_loras(case.model, case.adapters, case.calibration, schedule="jacobi", max_iter=t,
                                      progress=False)
            for t in (1, 2, 3, 6)}
    names = list(runs[6].deltas)
    for j, name in enumerate(names, start=1):  # layer j is final after j solves, not before
        for t in (1, 2, 3):
            close = torch.allclose(runs[t].deltas[name], runs[6].deltas[name], rtol=1e-5, atol=1e-6)
            assert close == (t >= j), (name, t)
    assert runs[6].history[3].change[names[-1]] < 1e-6
    assert runs[3].history[2].change[names[-1]] > 1e-3


@pytest.mark.parametrize("kind", ["llama", "bert", "t5"])
def test_padding_does_not_change_the_merge(tmp_path, kind):
    case = merge_case(kind, tmp_path, n_tasks=2)
    padded = []
    for batches in case.calibration:
        more = []
        for b in batches:
            b = dict(b)
            extra = 5
            b["input_ids"] = torch.cat([b["input_ids"], torch.zeros(b["input_ids"].shape[0], extra, dtype=torch.long)], 1)
            b["attention_mask"] = torch.cat([b["attention_mask"], torch.zeros(b["attention_mask"].shape[0], extra, dtype=torch.long)], 1)
            if "labels" in b:
                b["labels"] = torch.cat([b["labels"], torch.full((b["labels"].shape[0], extra), -100)], 1)
            more.append(b)
        padded.append(more)
    kwargs = dict(schedule="jacobi", max_iter=2, progress=False)
    plain = iteris_lab.merge_loras(case.model, case.adapters, case.calibration, **kwargs)
    extra = iteris_lab.merge_loras(case.model, case.adapters, padded, **kwargs)
    for name in plain.deltas:
        assert torch.allclose(plain.deltas[name], extra.deltas[name], rtol=1e-4, atol=1e-5), name


def test_t5_decoder_features_come_from_every_real_target_position():
    model = build_tiny("t5")
    batches = token_batches("t5", n_batches=2)
    modules = dict(model.named_modules())
    names = ["decoder.block.0.layer.0.SelfAttention.q", "decoder.block.1.layer.2.DenseReluDense.wo",
             "decoder.block.0.layer.1.EncDecAttention.k", "encoder.block.0.layer.0.SelfAttention.q"]
    grams = gram_pass(model, {n: Target(n, modules[n]) for n in names}, batches)
    decoder_rows = sum(int((b["labels"] != -100).sum()) for b in batches)
    encoder_rows = sum(int(b["attention_mask"].sum()) for b in batches)
    assert decoder_rows > len(batches) * batches[0]["labels"].shape[0]  # more than one position per sequence
    assert grams.rows[grams.group_of(names[0])] == decoder_rows
    assert grams.rows[grams.group_of(names[1])] == decoder_rows
    assert grams.rows[grams.group_of(names[2])] == encoder_rows  # cross-attention k/v read encoder tokens
    assert grams.rows[grams.group_of(names[3])] == encoder_rows


def test_modules_reading_one_input_share_their_grams():
    model = build_tiny("llama")
    modules = dict(model.named_modules())
    names = [n for n in modules if n.endswith(("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "o_proj"))]
    grams = gram_pass(model, {n: Target(n, modules[n]) for n in names}, token_batches("llama"))
    groups = set(grams.gram)
    assert ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj") in groups
    assert ("model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj") in groups
    assert ("model.layers.0.self_attn.o_proj",) in groups


@pytest.mark.parametrize("kind", ["gpt2", "conv", "bert"])
def test_architectures_merge_and_export_reproduces_the_dense_merge(tmp_path, kind):
    case = merge_case(kind, tmp_path, n_tasks=2)
    before = state(case.model)
    result = iteris_lab.merge_loras(case.model, case.adapters, case.calibration, schedule="jacobi", max_iter=2,
                                    progress=False)
    assert_unchanged(case.model, before)
    report = result.save_adapter(tmp_path / "merged")
    assert report.max_relative_error == 0.0
    dense = result.apply_to(copy.deepcopy(case.model))
    loaded = PeftModel.from_pretrained(copy.deepcopy(case.model), report.path).eval()
    batch = case.calibration[0][0]
    assert torch.allclose(outputs(loaded, batch), outputs(dense, batch), atol=1e-4)
    assert not torch.allclose(outputs(dense, batch), outputs(case.model, batch), atol=1e-4)


def test_three_adapters_of_different_ranks_with_rslora_export_exact_and_truncated(tmp_path):
    model = build_tiny("llama")
    from tiny import make_lora
    adapters = [make_lora(model, tmp_path / f"a{i}", TARGETS["llama"][:4], r=r, use_rslora=rs, seed=i + 1)
                for i, (r, rs) in enumerate([(4, False), (2, True), (6, False)])]
    calibration = [token_batches("llama", seed=20 + i) for i in range(3)]
    result = iteris_lab.merge_loras(model, adapters, calibration, schedule="jacobi", max_iter=3, progress=False)
    assert all(B.shape[1] == 12 for B, A in result.factors.values())
    exact = result.save_adapter(tmp_path / "exact")
    assert set(exact.ranks.values()) == {12} or max(exact.ranks.values()) <= 12
    truncated = result.save_adapter(tmp_path / "r3", rank=3)
    assert set(truncated.ranks.values()) == {3} and 0 < truncated.max_relative_error < 1
    batch = calibration[0][0]
    dense = outputs(result.apply_to(copy.deepcopy(model)), batch)
    exact_out = outputs(PeftModel.from_pretrained(copy.deepcopy(model), exact.path).eval(), batch)
    assert torch.allclose(exact_out, dense, atol=1e-4)
    # the truncated adapter is exactly the rank-3 SVD of each ΔW
    approx = copy.deepcopy(model)
    modules = dict(approx.named_modules())
    for name, delta in result.deltas.items():
        u, s, vh = torch.linalg.svd(delta.double())
        modules[name].weight.data += ((u[:, :3] * s[:3]) @ vh[:3]).float()
    truncated_out = outputs(PeftModel.from_pretrained(copy.deepcopy(model), truncated.path).eval(), batch)
    assert torch.allclose(truncated_out, outputs(approx, batch), atol=1e-4)


def test_rslora_scale_is_read(tmp_path):
    model = build_tiny("mlp")
    from tiny import make_lora
    path = make_lora(model, tmp_path / "rs", ["0"], r=4, lora_alpha=8, use_rslora=True)
    layer = iteris_lab.load_adapter(path).layers["0"]
    assert layer.scale == pytest.approx(8 / 2)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), path)
    expected = peft_model.base_model.model[0].get_delta_weight("default")
    assert torch.allclose(layer.delta().float(), expected, atol=1e-6)


@pytest.mark.parametrize("method", iteris_lab.METHODS)
def test_every_method_runs_and_leaves_the_model_unchanged(tmp_path, method):
    case = merge_case("llama", tmp_path, n_tasks=3)
    before = state(case.model)
    result = iteris_lab.merge_loras(case.model, case.adapters, case.calibration, method=method, schedule="jacobi",
                                    max_iter=2,
                                    progress=False, seed=1)
    assert_unchanged(case.model, before)
    assert set(result.deltas) == {n for n, _ in case.model.named_modules() if n.endswith(tuple(TARGETS["llama"]))}
    assert all(torch.isfinite(d).all() for d in result.deltas.values())
    assert len(result.history) == (2 if method == "iteris" else 1 if method == "regmean" else 0)


def test_linear_is_the_average_and_cat_the_sum(tmp_path):
    case = merge_case("mlp", tmp_path, n_tasks=3)
    adapters = [iteris_lab.load_adapter(a) for a in case.adapters]
    linear = iteris_lab.merge_loras(case.model, case.adapters, method="linear", progress=False)
    cat = iteris_lab.merge_loras(case.model, case.adapters, method="cat", progress=False)
    for name in linear.deltas:
        deltas = [a.layers[name].delta().float() for a in adapters]
        assert torch.allclose(linear.deltas[name], sum(deltas) / 3, atol=1e-6)
        assert torch.allclose(cat.deltas[name], sum(deltas), atol=1e-6)


def test_dare_is_reproducible_from_its_seed(tmp_path):
    case = merge_case("mlp", tmp_path, n_tasks=2)
    runs = [iteris_lab.merge_loras(case.model, case.adapters, method="dare_ties", seed=s, progress=False)
            for s in (3, 3, 4)]
    name = next(iter(runs[0].deltas))
    assert torch.equal(runs[0].deltas[name], runs[1].deltas[name])
    assert not torch.equal(runs[0].deltas[name], runs[2].deltas[name])


def test_bf16_base_merges_with_float32_grams(tmp_path):
    case = merge_case("llama", tmp_path, n_tasks=2)
    reference = iteris_lab.merge_loras(case.model, case.adapters, case.calibration, schedule="jacobi", max_iter=1,
                                       progress=False)
    half = copy.deepcopy(case.model).to(torch.bfloat16)
    before = state(half)
    result = iteris_lab.merge_loras(half, case.adapters, case.calibration, schedule="jacobi", max_iter=1,
                                    progress=False)
    assert_unchanged(half, before)
    for name, delta in result.deltas.items():
        assert delta.dtype == torch.float32
        assert torch.linalg.norm(delta - reference.deltas[name]) < 0.1 * torch.linalg.norm(reference.deltas[name])


def test_history_records_weights_objective_drift(tmp_path):
    case = merge_case("llama", tmp_path, n_tasks=2)
    result = iteris_lab.merge_loras(case.model, case.adapters, case.calibration, schedule="jacobi", max_iter=3,
                                    progress=False)
    first, last = result.history[0], result.history[-1]
    name = next(iter(result.deltas))
    assert len(first.lambdas[name]) == 2 and all(w > 0 for w in first.lambdas[name])
    assert first.merged_objective is None and last.merged_objective is not None
    assert all(d == pytest.approx(0, abs=1e-9) for d in first.drift[name])
    deep = list(result.deltas)[-1]
    assert any(d > 0 for d in last.drift[deep])  # the merged model's inputs differ from the task model's
    report = result.report()
    assert report["iterations"][0]["iteration"] == 1 and len(report["iterations"]) == 3


def test_float64_statistics_match_an_exact_solve_where_float32_ones_do_not(tmp_path):
    """α = 1e-7 with fewer rows than inputs (the paper's Flan-T5 setting): the Grams are rank-deficient, the solve
    amplifies float32 rounding of the statistics; gram_dtype="float64" removes it."""
    case = merge_case("llama", tmp_path, n_tasks=2, targets=["q_proj", "v_proj"])
    case.calibration = [token_batches("llama", n_batches=1, batch_size=2, seq_len=5, seed=30 + i) for i in range(2)]
    kwargs = dict(schedule="jacobi", max_iter=1, alpha=1e-7, adaptive_weights="none", progress=False)
    single = iteris_lab.merge_loras(case.model, case.adapters, case.calibration, **kwargs)
    double = iteris_lab.merge_loras(case.model, case.adapters, case.calibration, gram_dtype="float64", **kwargs)
    adapters = [iteris_lab.load_adapter(a) for a in case.adapters]
    names = list(single.deltas)
    features = [lora_inputs(case.model, a, cal, names) for a, cal in zip(case.adapters, case.calibration)]
    errors = {"float32": 0.0, "float64": 0.0}
    for name in names:
        grams = [f[name].T @ f[name] for f in features]
        assert sum(f[name].shape[0] for f in features) < grams[0].shape[0]  # rank-deficient
        eye = torch.eye(grams[0].shape[0], dtype=torch.float64)
        reg = [g + 1e-7 * torch.linalg.matrix_norm(g) * eye for g in grams]
        key = next(k for k in adapters[0].layers if name.endswith(k))
        numerator = sum(a.layers[key].delta() @ g for a, g in zip(adapters, reg))
        exact = torch.linalg.solve(sum(reg), numerator.T).T
        for label, result in (("float32", single), ("float64", double)):
            error = float((result.deltas[name].double() - exact).norm() / exact.norm())
            errors[label] = max(errors[label], error)
    assert errors["float64"] < 1e-5
    assert errors["float32"] > 10 * errors["float64"]


def test_delta_hooks_drop_a_solved_delta_once_a_newer_one_is_applied(tmp_path):
    case = merge_case("mlp", tmp_path, n_tasks=2)
    model, x = case.model, case.calibration[0][0]
    targets = {"2": Target("2", model.get_submodule("2"))}
    old = (torch.randn(16, 4), torch.randn(4, 16))
    gone = weakref.ref(old[0])
    with DeltaHooks(targets) as hooks, torch.no_grad():
        hooks.set({"2": old})
        first = model(x)
        hooks.set({"2": (torch.randn(16, 4), torch.randn(4, 16))})
        second = model(x)
        del old
        assert gone() is None  # old code kept every solve's factors until the merge ended
    assert not torch.equal(first, second)
