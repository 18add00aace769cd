"""Measuring a merge: a model run at W0 + ΔW inside a block (`weights_added`) and the peak memory a block took
(`PeakMemory`). Every track and hub recipe scores a merge this way; neither helper knows about a track."""
from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .targets import Target, resolve_names


@contextmanager
def weights_added(model, deltas: dict):
    """Within the block, model weights are W0 + ΔW for {module name: ΔW tensor or LoraLayer}; W0 after, restored
    exactly even on error. For evaluating a merge at full speed on an in-memory model (the merge itself applies ΔW
    through hooks and never writes weights)."""
    names = resolve_names(model, deltas)
    modules = dict(model.named_modules())
    targets = {names[k]: Target(names[k], modules[names[k]]) for k in deltas}
    originals = {name: target.module.weight.detach().clone() for name, target in targets.items()}
    try:
        for key, delta in deltas.items():
            if hasattr(delta, "delta"):  # a LoraLayer: build its ΔW only while writing it
                delta = delta.delta()
            targets[names[key]].write(originals[names[key]], delta)
        yield model
    finally:
        with torch.no_grad():
            for name, target in targets.items():
                target.module.weight.copy_(originals[name])


class PeakMemory:
    """Peak extra memory of a block in MB: CUDA's allocator peak on GPU, else the process RSS sampled every 20 ms."""

    def __init__(self, device: torch.device):
        self.device, self.peak_mb = device, 0.0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        import psutil

        process, self._stop = psutil.Process(), threading.Event()
        self._start = process.memory_info().rss
        self._rss = [self._start]

        def sample():
            while not self._stop.wait(0.02):
                self._rss.append(process.memory_info().rss)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak_mb = (torch.cuda.max_memory_allocated(self.device) - self._start) / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mb = (max(self._rss) - self._start) / 2**20
        return False


def distances_to(deltas: dict, reference: dict) -> dict[str, float]:
    """{layer: ‖ΔW − ΔW*‖_F / ‖ΔW*‖_F} for every layer of `reference` (e.g. a Jacobi solve's ΔW against the sweep's
    fixed point ΔW*), in float64."""
    return {name: float((deltas[name].double() - ref.double()).norm() / ref.double().norm())
            for name, ref in reference.items()}


# ---------------------------------------------------------------------------------------------------------------
# Uncertainty: is a difference between two models on the same examples a finding, or noise?


@dataclass(frozen=True)
class PairedDifference:
    """mean(a − b) over n paired examples with a `confidence` paired-bootstrap interval [low, high]; for 0/1
    outcomes also the exact McNemar p-value (a two-sided binomial test on the discordant pairs), else None."""

    mean: float
    low: float
    high: float
    n: int
    confidence: float
    p_value: float | None = None

    @property
    def verdict(self) -> str:
        """"ahead" (a > b: the interval lies above 0), "behind" (below 0) or "within noise" (it holds 0). For 0/1
        outcomes the exact McNemar test must agree (p < 1 − confidence): when few examples differ (say 4 of 60, all
        one way: p = 0.125) a resample rarely drops them all, so the percentile interval is too narrow there."""
        if self.p_value is not None and self.p_value >= 1 - self.confidence:
            return "within noise"
        if self.low > 0:
            return "ahead"
        if self.high < 0:
            return "behind"
        return "within noise"

    def brief(self) -> str:
        """"+0.003 [-0.016, +0.023] within noise": the difference, its interval and the verdict, for tables."""
        return f"{self.mean:+.3f} [{self.low:+.3f}, {self.high:+.3f}] {self.verdict}"

    def __str__(self) -> str:
        p = f", McNemar p = {self.p_value:.3g}" if self.p_value is not None else ""
        return (f"{self.mean:+.4f} [{self.low:+.4f}, {self.high:+.4f}] ({self.confidence:.0%} paired bootstrap, "
                f"n = {self.n}{p}): {self.verdict}")


def paired_difference(a, b, *, confidence: float = 0.95, resamples: int = 10_000,
                      seed: int = 0) -> PairedDifference:
    """Mean difference of two models' per-example outcomes on the same examples, with a seeded paired bootstrap
    percentile interval (the n differences a_k − b_k resampled with replacement `resamples` times) and, when
    every outcome is 0 or 1 (right / wrong), the exact McNemar p-value.

    a, b: sequences (or 1-D arrays/tensors) of equal length n ≥ 1, outcome k of both models on example k — e.g.
    correct (1) or not (0), or a per-example score. The same seed gives the same interval. Pairing matters: two
    merges that fail on the same hard examples differ far less than their unpaired standard errors suggest.
    """
    import numpy as np

    a = np.asarray(a, dtype=np.float64).reshape(-1)
    b = np.asarray(b, dtype=np.float64).reshape(-1)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"paired_difference needs two equally long, non-empty outcome lists (one per example, the "
                         f"same examples in the same order), got {a.size} and {b.size}.")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("paired_difference: an outcome is NaN or infinite; score every example first.")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}.")
    d = a - b
    rng = np.random.default_rng(seed)
    chunk = max(1, 2**22 // d.size)  # resampled index blocks of ~32 MB, whatever n
    means = np.concatenate([d[rng.integers(0, d.size, size=(min(chunk, resamples - start), d.size))].mean(axis=1)
                            for start in range(0, resamples, chunk)])
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    p_value = None
    if np.isin(a, (0, 1)).all() and np.isin(b, (0, 1)).all():
        p_value = mcnemar_p(int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum()))
    return PairedDifference(float(d.mean()), float(low), float(high), int(d.size), confidence, p_value)


def mcnemar_p(only_a: int, only_b: int) -> float:
    """Exact two-sided McNemar p-value: under "no difference" each of the only_a + only_b discordant examples
    (right for one model only) is equally likely to favour either model, a binomial(n, 1/2)."""
    from scipy.stats import binomtest

    n = only_a + only_b
    return 1.0 if n == 0 else float(binomtest(only_a, n, 0.5).pvalue)


# ---------------------------------------------------------------------------------------------------------------
# One rank rule for every chapter.


def numerical_rank(matrix: torch.Tensor) -> int:
    """The number of singular values above σ_max · max(rows, cols) · ε, with ε the machine epsilon of the
    matrix's dtype (float32: 1.2e-7; float64: 2.2e-16) — numpy's and torch.linalg.matrix_rank's default rule.
    Below that line a singular value is indistinguishable from the rounding of a sum stored in that dtype, so a
    float32 Gram XᵀX of rank r reads as rank r, not as full rank because of rounding noise."""
    return int(torch.linalg.matrix_rank(matrix))
