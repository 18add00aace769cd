"""Measuring a merge: a model run at W0 + ΔW inside a block (`weights_added`) and the peak memory a block took
(`PeakMemory`). Every track and hub recipe scores a merge this way; neither helper knows about a track."""
from __future__ import annotations

import threading
from contextlib import contextmanager

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
