"""The `iteris-lab` command: merge, demo, bench."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .errors import IterisError

_AUTO_CLASS = {"CAUSAL_LM": "AutoModelForCausalLM", "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
               "SEQ_CLS": "AutoModelForSequenceClassification", "TOKEN_CLS": "AutoModelForTokenClassification"}


def load_base(base: str, task_type: str | None, dtype: str = "float32"):
    """(model, tokenizer) from a local folder or a hub id, with the Auto class the adapters were trained for."""
    import torch
    import transformers

    auto = getattr(transformers, _AUTO_CLASS.get(task_type or "", "AutoModel"))
    model = auto.from_pretrained(base, dtype=getattr(torch, dtype))
    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval(), tokenizer


def cmd_merge(args) -> dict:
    from .adapters import load_adapter
    from .calibration import read_inputs, tokenize
    from .merge import merge_loras

    if Path(args.out).exists() and not args.overwrite:  # fail before the slow part
        raise IterisError(f"{args.out} already exists; pass --overwrite to replace it.")
    adapters = [load_adapter(a) for a in args.adapter]
    if args.calibration and len(args.calibration) != len(adapters):
        raise IterisError(f"got {len(args.calibration)} --calibration files for {len(adapters)} --adapter folders.")
    start = time.perf_counter()
    model, tokenizer = load_base(args.base, adapters[0].config.get("task_type"), args.dtype)
    loaded = time.perf_counter()
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    calibration = [tokenize(tokenizer, read_inputs(f), args.batch_size, args.max_length, encoder_decoder)
                   for f in args.calibration or []] or None
    result = merge_loras(model, adapters, calibration, method=args.method, max_iter=args.max_iter, alpha=args.alpha,
                         adaptive_weights=args.adaptive_weights, weights=args.weights, density=args.density,
                         modules=args.modules, seed=args.seed, progress=not args.quiet, schedule=args.schedule,
                         gram_dtype=args.gram_dtype)
    result.base_model = args.base
    export = result.save_adapter(args.out, rank=args.rank, overwrite=args.overwrite)
    report = result.report()
    report.update(base=args.base, out=export.path, ranks=export.ranks,
                  max_relative_error=export.max_relative_error,
                  timings={"load_seconds": loaded - start, "merge_seconds": result.seconds,
                           "total_seconds": time.perf_counter() - start})
    Path(args.out, "iteris_report.json").write_text(json.dumps(report, indent=2))
    print(f"{args.method}: merged {len(result.deltas)} layers of {len(adapters)} adapters in {result.seconds:.1f} s "
          f"-> {export.path} (report: iteris_report.json)")
    return report


def cmd_demo(args):
    from .bench import run_demo
    return run_demo(json_path=args.json, quiet=args.quiet)


def cmd_bench(args):
    from .bench import run_bench
    return run_bench(model=args.model, json_path=args.json, quiet=args.quiet)


def build_parser() -> argparse.ArgumentParser:
    from .merge import METHODS

    parser = argparse.ArgumentParser(prog="iteris-lab", description="Merge LoRA adapters with IterIS.")
    sub = parser.add_subparsers(dest="command", required=True)

    merge = sub.add_parser("merge", help="merge PEFT LoRA adapters of one base model into one adapter",
                           description="Merge PEFT LoRA adapters; writes a PEFT adapter and iteris_report.json.")
    merge.add_argument("--base", required=True, help="base model folder or hub id")
    merge.add_argument("--adapter", action="append", required=True, help="PEFT LoRA folder (repeat, >= 2)")
    merge.add_argument("--calibration", action="append",
                       help="unlabeled inputs per adapter, same order: .txt (one per line) or .jsonl ({'text': ...})")
    merge.add_argument("--method", default="iteris", choices=METHODS)
    merge.add_argument("--schedule", default="sweep", choices=("sweep", "jacobi"),
                       help="iteris: 'sweep' (default) solves each layer once, from the merged model's own inputs: "
                            "the fixed point of the paper's loop in one pass; 'jacobi' runs the paper's --max-iter "
                            "solves")
    merge.add_argument("--max-iter", type=int, default=10, help="IterIS solves with --schedule jacobi (default 10)")
    merge.add_argument("--gram-dtype", default="float32", choices=("float32", "float64"),
                       help="precision of the feature statistics (float64 for tiny --alpha with few samples)")
    merge.add_argument("--alpha", type=float, default=1e-4, help="regularizer α of α‖M‖_F·I (default 1e-4)")
    merge.add_argument("--adaptive-weights", default="official", choices=("official", "paper", "none"))
    merge.add_argument("--weights", type=float, nargs="+", help="per-adapter multipliers / mixing weights")
    merge.add_argument("--density", type=float, default=0.5, help="kept fraction for ties/dare/magnitude_prune")
    merge.add_argument("--modules", default="error", choices=("error", "intersection", "union"))
    merge.add_argument("--rank", type=int, help="truncate the merged adapter to this rank (default: exact)")
    merge.add_argument("--batch-size", type=int, default=8)
    merge.add_argument("--max-length", type=int, default=128)
    merge.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    merge.add_argument("--seed", type=int, default=0)
    merge.add_argument("--out", required=True, help="output folder for the merged adapter")
    merge.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    merge.add_argument("--quiet", action="store_true", help="no progress bars")
    merge.set_defaults(func=cmd_merge)

    demo = sub.add_parser("demo", help="merge the shipped LoRAs of the embedded default model with every method",
                          description="Load the embedded default model and its shipped task LoRAs, merge with every "
                                      "method, evaluate, print the table and write a JSON file.")
    demo.add_argument("--json", default="results.json", help="where to write the results (default results.json)")
    demo.add_argument("--quiet", action="store_true")
    demo.set_defaults(func=cmd_demo)

    bench = sub.add_parser("bench", help="the full benchmark of one model track",
                           description="Run the full benchmark (every method, both RegMean sample sizes).")
    bench.add_argument("--model", choices=("minilm", "smollm2"), default="minilm")
    bench.add_argument("--json", default="bench.json")
    bench.add_argument("--quiet", action="store_true")
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except IterisError as err:
        print(f"iteris-lab {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
