"""A golden snapshot of tiny merges, to prove that a refactoring of the engine changes no result.

    python benchmarks/golden.py save /tmp/golden.pt       # before the change
    python benchmarks/golden.py compare /tmp/golden.pt    # after it: max relative difference per merge

Every tiny model of tests/tiny.py (Llama, GPT-2 Conv1D, T5, BERT, a conv net) and the tiny UNet of
tests/test_diffusion.py is merged with IterIS (Jacobi, 3 solves; the sweep), RegMean and every data-free baseline.
The snapshot holds each merge's deltas and, for the solved methods, the λ, objective and drift of every record.
`compare` exits 1 when any value differs by more than 1e-6 (relative to the largest value of its tensor).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

TOLERANCE = 1e-6
KINDS = ("llama", "gpt2", "t5", "bert", "conv", "unet")
METHODS = {"jacobi": dict(schedule="jacobi", max_iter=3), "sweep": dict(schedule="sweep"),
           "regmean": dict(method="regmean"),
           "paper_lambdas": dict(schedule="jacobi", max_iter=2, adaptive_weights="paper", alpha=1e-3)}
DATA_FREE = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune", "cat")


def _problem(kind: str, directory: Path):
    from tiny import merge_case, token_batches

    if kind == "unet":
        from tiny_diffusion import pixel_unet_and_loras, pixel_unet_batches

        unet, dirs = pixel_unet_and_loras(directory)
        return unet, dirs, [pixel_unet_batches(1), pixel_unet_batches(2)]
    case = merge_case(kind, directory, n_tasks=3)
    if kind in ("llama", "t5"):  # several padded batches per task
        case.calibration = [token_batches(kind, n_batches=3, batch_size=3, seq_len=6, seed=40 + i) for i in range(3)]
    return case.model, case.adapters, case.calibration


def snapshot() -> dict:
    """{"kind/method": {"deltas": {...}, "records": [{field: {layer: [per task]}}]}}."""
    from iteris_lab import merge_loras

    out = {}
    for kind in KINDS:
        with tempfile.TemporaryDirectory() as work:
            model, adapters, calibration = _problem(kind, Path(work))
            runs = {**METHODS, **{m: dict(method=m) for m in DATA_FREE}}
            for label, kwargs in runs.items():
                result = merge_loras(model, adapters, calibration, progress=False, **kwargs)
                records = [{"lambdas": r.lambdas, "objective": r.objective, "drift": r.drift} for r in result.history]
                out[f"{kind}/{label}"] = {"deltas": result.deltas, "records": records}
    return out


def _flatten(value, prefix=""):
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _flatten(v, f"{prefix}/{k}")
    elif isinstance(value, list) and value and not isinstance(value[0], float):
        for k, v in enumerate(value):
            yield from _flatten(v, f"{prefix}/{k}")
    else:
        yield prefix, torch.as_tensor(value, dtype=torch.float64)


def compare(before: dict, after: dict) -> dict[str, float]:
    """Max relative difference per merge (of deltas and records), each tensor relative to its own largest value."""
    worst = {}
    for key in before:
        a, b = dict(_flatten(before[key])), dict(_flatten(after[key]))
        if a.keys() != b.keys():
            worst[key] = float("inf")
            continue
        worst[key] = max((float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-30)) for k in a
                          if a[k].numel()), default=0.0)
    return worst


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("save", "compare"))
    parser.add_argument("path")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # one thread: the sums' order, hence their rounding, does not depend on the machine
    current = snapshot()
    if args.action == "save":
        torch.save(current, args.path)
        print(f"saved {len(current)} merges to {args.path}")
        return 0
    worst = compare(torch.load(args.path), current)
    for key, value in worst.items():
        print(f"{key:32s} {value:.1e}{'' if value <= TOLERANCE else '   <-- differs'}")
    identical = sum(v == 0 for v in worst.values())
    print(f"{identical} of {len(worst)} merges bit-identical; largest difference {max(worst.values()):.1e}")
    return 0 if max(worst.values()) <= TOLERANCE else 1


if __name__ == "__main__":
    raise SystemExit(main())
