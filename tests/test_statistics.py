"""statistics.py: the one accumulator of S = XᵀX, P = XᵀX̃, Q = X̃ᵀX̃ and the one sharing rule, checked against
sums computed directly from captured features; and the passes that feed it (passes.py)."""
import threading

import torch

import iteris_lab
from iteris_lab.plumbing.deltas import DeltaHooks
from iteris_lab.features import gram_pass, paired_pass
from iteris_lab.statistics import Statistics
from iteris_lab.targets import Target
from tiny import merge_case


def batches_of(seed, sizes=(5, 3, 4), width=6):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(n, width, generator=generator) for n in sizes]


def test_sums_equal_the_products_of_all_rows_and_p_q_split_from_s_when_x_tilde_differs():
    xs, xts = batches_of(0), batches_of(1)
    xts[0] = xs[0].clone()  # the first batch has X̃ = X (equal values, another tensor)
    stats = Statistics()
    stats.add(xs[0], xts[0])
    assert stats.p is stats.s and stats.q is stats.s  # one matrix held while X̃ = X
    for x, xt in zip(xs[1:], xts[1:]):
        stats.add(x, xt)
    X, Xt = torch.cat(xs).double(), torch.cat(xts).double()
    for got, want in ((stats.s, X.T @ X), (stats.p, X.T @ Xt), (stats.q, Xt.T @ Xt)):
        assert torch.allclose(got.double(), want, atol=1e-5)
    assert stats.rows == 12


def test_the_float64_copy_keeps_one_matrix_where_p_and_q_are_s_and_shrinks_off_diagonal_entries():
    stats = Statistics()
    for x in batches_of(2):
        stats.add(x)
    copy = stats.float64(shrink=0.5)
    assert copy.s.dtype == torch.float64 and copy.p is copy.s and copy.q is copy.s
    assert torch.equal(torch.diagonal(copy.s), torch.diagonal(stats.s.double()))
    assert torch.allclose(copy.s[0, 1], 0.5 * stats.s[0, 1].double())


def test_paired_pass_sums_s_p_q_of_the_task_model_and_the_merged_model(tmp_path):
    case = merge_case("mlp", tmp_path, n_tasks=2)
    model, names = case.model, ["0", "2", "4"]
    targets = {n: Target(n, model.get_submodule(n)) for n in names}
    task = {n: (torch.randn(targets[n].layer.out_features, 2), torch.randn(2, targets[n].layer.in_features))
            for n in names}
    merged = {n: (0.5 * B, A) for n, (B, A) in task.items()}
    captured = {"task": {n: [] for n in names}, "merged": {n: [] for n in names}}

    def features(role):
        with DeltaHooks(targets) as hooks, torch.no_grad():
            hooks.set(task if role == "task" else merged)
            handles = [targets[n].module.register_forward_pre_hook(
                lambda m, args, n=n: captured[role][n].append(args[0])) for n in names]
            for x in case.calibration[0]:
                model(x)
            for h in handles:
                h.remove()
        return {n: torch.cat(v).double() for n, v in captured[role].items()}

    X, Xt = features("task"), features("merged")
    with DeltaHooks(targets) as hooks:
        stats = paired_pass(model, targets, case.calibration[0], hooks, task, merged)
    for n in names:
        st = stats.groups[(n,)]
        assert torch.allclose(st.s.double(), X[n].T @ X[n], atol=1e-4)
        assert torch.allclose(st.p.double(), X[n].T @ Xt[n], atol=1e-4)
        assert torch.allclose(st.q.double(), Xt[n].T @ Xt[n], atol=1e-4)
    assert not torch.allclose(X["4"], Xt["4"])  # the merged model's inputs really differ downstream


def test_modules_reading_one_tensor_share_statistics_in_both_schedules(tmp_path):
    case = merge_case("llama", tmp_path, n_tasks=2)
    model = case.model
    names = [n for n, _ in model.named_modules() if n.endswith(("q_proj", "k_proj", "v_proj", "o_proj"))]
    targets = {n: Target(n, model.get_submodule(n)) for n in names}
    groups = set(gram_pass(model, targets, case.calibration[0]).groups)
    assert len(groups) == 4 and all(len(g) in (1, 3) for g in groups)  # (q, k, v) and (o,) per block
    with DeltaHooks(targets) as hooks:
        paired = paired_pass(model, targets, case.calibration[0], hooks, {}, {})
    assert set(paired.groups) == groups


def test_no_thread_is_started_by_either_schedule(tmp_path):
    case = merge_case("llama", tmp_path, n_tasks=2)
    counts = set()

    def forward(model, batch):
        counts.add(threading.active_count())
        return model(**batch)

    before = threading.active_count()
    for schedule in ("sweep", "jacobi"):
        iteris_lab.merge_loras(case.model, case.adapters, case.calibration, schedule=schedule,
                               **({"max_iter": 2} if schedule == "jacobi" else {}),
                               forward=forward, progress=False)
    assert counts == {before}


def test_a_forward_that_swallows_the_unwinding_cannot_hang_the_merge(tmp_path):
    case = merge_case("llama", tmp_path, n_tasks=2)

    def stubborn(model, batch):  # retries once on any exception, the unwinding of an ended merge included
        try:
            return model(**batch)
        except BaseException:
            return model(**batch)

    def broken(model, batch):  # inside the pass (its greenlet), before the model runs: passes that run after the
        raise RuntimeError("the forward function failed")  # last adapted layer are closed there, not run to the end

    outcome = []

    def run():
        try:
            iteris_lab.merge_loras(case.model, case.adapters, case.calibration, schedule="sweep",
                                   forward=[stubborn, broken], progress=False)
        except RuntimeError as err:
            outcome.append(str(err))

    worker = threading.Thread(target=run, daemon=True)  # old code waited forever in join(): fail, do not hang
    worker.start()
    worker.join(timeout=120)
    assert outcome == ["the forward function failed"]


def test_batches_reach_the_device_when_their_pass_starts(tmp_path, monkeypatch):
    from iteris_lab.plumbing import passes

    case = merge_case("mlp", tmp_path, n_tasks=2)
    moved, started = [], []
    real = passes.to_device
    monkeypatch.setattr(passes, "to_device", lambda batch, device: moved.append(len(started)) or real(batch, device))

    def forward(model, batch):
        started.append(1)
        return model(batch)

    iteris_lab.merge_loras(case.model, case.adapters, case.calibration, schedule="sweep", forward=forward,
                           progress=False)
    assert moved == list(range(len(moved)))  # each batch moved just before its own pass began, none ahead
