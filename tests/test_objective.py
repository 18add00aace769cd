"""The closed forms of objective.py against independent computations on raw features."""
import pytest
import torch

from iteris_lab.adapters import LoraLayer
from iteris_lab.errors import SolveError
from iteris_lab.objective import (LayerProblem, adaptive_weight, objective, output_energy, regularize,
                                  shrink_off_diagonal, solve)

OUT, IN, RANKS = 5, 6, (2, 3, 1)


def random_case(seed=0, rows=(9, 7, 12), drift=0.3):
    """Three tasks: LoRA factors, features X_i and perturbed merged-model features X̃_i (rows, in)."""
    g = torch.Generator().manual_seed(seed)
    loras, xs, xts = [], [], []
    for r, n in zip(RANKS, rows):
        A, B = torch.randn(r, IN, generator=g), torch.randn(OUT, r, generator=g)
        loras.append(LoraLayer(A, B, scale=0.5 + r))
        # anisotropic features, different per task
        x = torch.randn(n, IN, generator=g, dtype=torch.float64) @ torch.randn(IN, IN, generator=g, dtype=torch.float64)
        xs.append(x)
        xts.append(x + drift * torch.randn(n, IN, generator=g, dtype=torch.float64))
    return loras, xs, xts


def problem_from(loras, xs, xts, weights):
    return LayerProblem("layer", loras, [x.T @ xt for x, xt in zip(xs, xts)], [xt.T @ xt for xt in xts],
                        list(weights), rows=sum(x.shape[0] for x in xs))


def autograd_optimum(loras, xs, xts, weights, alpha):
    """Minimize Σ λ_i (‖X_iΔW_iᵀ − X̃_iWᵀ‖² + b_i‖W‖² − 2 a_i⟨ΔW_i, W⟩) with a_i = α‖X_iᵀX̃_i‖_F,
    b_i = α‖X̃_iᵀX̃_i‖_F: the objective whose stationary point is the regularized closed form."""
    w = torch.zeros(OUT, IN, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def loss():
        opt.zero_grad()
        total = 0
        for lora, x, xt, lam in zip(loras, xs, xts, weights):
            d = lora.delta()
            a, b = alpha * torch.linalg.matrix_norm(x.T @ xt), alpha * torch.linalg.matrix_norm(xt.T @ xt)
            total = total + lam * ((x @ d.T - xt @ w.T).square().sum() + b * w.square().sum() - 2 * a * (d * w).sum())
        total.backward()
        return total

    for _ in range(5):
        opt.step(loss)
    return w.detach()


@pytest.mark.parametrize("alpha", [0.0, 1e-2])
@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0), (0.3, 2.0, 0.7)])
def test_closed_form_is_the_autograd_optimum(alpha, weights):
    loras, xs, xts = random_case()
    B, A = solve(problem_from(loras, xs, xts, weights), alpha)
    expected = autograd_optimum(loras, xs, xts, weights, alpha)
    assert torch.allclose(B @ A, expected, atol=1e-6, rtol=1e-6)


def test_solution_is_the_dense_formula_and_a_lora_of_rank_sum():
    loras, xs, xts = random_case(seed=1)
    weights, alpha = (0.5, 1.5, 1.0), 1e-3
    problem = problem_from(loras, xs, xts, weights)
    B, A = solve(problem, alpha)
    c = [regularize(m, alpha) for m in problem.cross]
    g = sum(lam * regularize(m, alpha) for lam, m in zip(weights, problem.gram))
    dense = sum(lam * lora.delta() @ ci for lam, lora, ci in zip(weights, loras, c)) @ torch.linalg.inv(g)
    assert torch.allclose(B @ A, dense, atol=1e-9)
    assert B.shape == (OUT, sum(RANKS)) and A.shape == (sum(RANKS), IN)


def test_objective_from_grams_equals_the_direct_value():
    loras, xs, xts = random_case(seed=2)
    problem = problem_from(loras, xs, xts, (1.0, 1.0, 1.0))
    B, A = solve(problem, 1e-3)
    energies = [output_energy(lora, x.T @ x) for lora, x in zip(loras, xs)]
    values = objective(problem, B, A, energies)
    direct = [float((x @ lora.delta().T - xt @ (B @ A).T).square().sum()) for lora, x, xt in zip(loras, xs, xts)]
    assert values == pytest.approx(direct, rel=1e-9)
    assert energies == pytest.approx([float((x @ lora.delta().T).square().sum()) for lora, x in zip(loras, xs)])


def test_adaptive_weight_variants_match_their_definitions():
    loras, xs, _ = random_case(seed=3)
    w0 = torch.randn(OUT, IN, dtype=torch.float64)
    for lora, x in zip(loras, xs):
        d = lora.delta()
        paper = d.square().sum() / (x @ d.T).square().sum()
        official = (w0 + d).square().sum() / (x @ (w0 + d).T).square().sum()
        assert adaptive_weight(lora, x.T @ x, w0, "paper") == pytest.approx(float(paper), rel=1e-10)
        assert adaptive_weight(lora, x.T @ x, w0, "official") == pytest.approx(float(official), rel=1e-10)
        assert adaptive_weight(lora, x.T @ x, w0, "none") == 1.0
    assert adaptive_weight(None, xs[0].T @ xs[0], w0, "paper") is None


def test_scaling_all_weights_changes_nothing():
    loras, xs, xts = random_case(seed=4)
    B1, A1 = solve(problem_from(loras, xs, xts, (0.2, 0.5, 3.0)), 1e-3)
    B2, A2 = solve(problem_from(loras, xs, xts, (2.0, 5.0, 30.0)), 1e-3)
    assert torch.allclose(B1 @ A1, B2 @ A2, atol=1e-10)


def test_identical_features_and_one_task_recover_its_delta():
    loras, xs, _ = random_case(seed=5)
    problem = problem_from(loras[:1], xs[:1], xs[:1], (1.0,))
    B, A = solve(problem, 0.0)
    assert torch.allclose(B @ A, loras[0].delta(), atol=1e-8)


def test_isotropic_features_give_the_weighted_average():
    loras, _, _ = random_case(seed=6)
    eye = torch.eye(IN, dtype=torch.float64)
    weights = (0.2, 0.3, 0.5)
    problem = LayerProblem("layer", loras, [eye] * 3, [eye] * 3, list(weights), rows=100)
    B, A = solve(problem, 0.0)
    average = sum(w * lora.delta() for w, lora in zip(weights, loras))
    assert torch.allclose(B @ A, average, atol=1e-10)


def test_alpha_zero_with_too_few_rows_names_the_layer():
    loras, xs, xts = random_case(seed=7, rows=(1, 2, 1))
    with pytest.raises(SolveError, match="layer.*alpha"):
        solve(problem_from(loras, xs, xts, (1.0, 1.0, 1.0)), 0.0)
    B, A = solve(problem_from(loras, xs, xts, (1.0, 1.0, 1.0)), 1e-3)  # regularized: well posed
    assert torch.isfinite(B @ A).all()


def test_alpha_zero_with_collinear_features_states_their_rank_and_suggests_alpha():
    loras, _, _ = random_case(seed=8)
    ones = torch.ones(IN, IN, dtype=torch.float64)  # every row (1, ..., 1)·c: many rows, rank 1, no dead input
    problem = LayerProblem("layer", loras, [ones] * 3, [ones] * 3, [1.0, 1.0, 1.0], rows=100)
    with pytest.raises(SolveError, match=r"layer: .* numerical rank 1 of 6: .* alpha > 0"):
        solve(problem, 0.0)


def test_indefinite_statistics_with_alpha_point_to_their_precision_not_to_alpha():
    loras, xs, xts = random_case(seed=9)
    problem = problem_from(loras, xs, xts, (1.0, 1.0, 1.0))
    problem.gram = [q - 10 * torch.eye(IN, dtype=torch.float64) * torch.linalg.matrix_norm(q) for q in problem.gram]
    with pytest.raises(SolveError, match="not positive definite even with alpha=0.0001.*gram_dtype='float64'") as err:
        solve(problem, 1e-4)
    assert "alpha >" not in str(err.value) and "e.g. 1e-4" not in str(err.value)


def test_regmean_shrink_keeps_the_diagonal():
    m = torch.arange(9.0, dtype=torch.float64).reshape(3, 3)
    shrunk = shrink_off_diagonal(m, 0.25)
    assert torch.equal(torch.diagonal(shrunk), torch.diagonal(m))
    assert shrunk[0, 1] == pytest.approx(0.25 * m[0, 1])
