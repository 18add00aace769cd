"""`iteris-lab merge`: load the base model, read the adapters and calibration files, merge, write the adapter."""
from __future__ import annotations

import json
import time
from pathlib import Path

from ..errors import IterisError
from .options import finite_float, fraction, non_negative, positive_int

_AUTO_CLASS = {"CAUSAL_LM": "AutoModelForCausalLM", "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
               "SEQ_CLS": "AutoModelForSequenceClassification", "TOKEN_CLS": "AutoModelForTokenClassification"}
# For adapters without task_type (PEFT's default): the task read from the base model's `architectures`, so that
# the merged adapter's keys are those PeftModel.from_pretrained(AutoModelFor<task>...) expects.
_ARCHITECTURE_TASK = (("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"), ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"),
                      ("ForSequenceClassification", "SEQ_CLS"), ("ForTokenClassification", "TOKEN_CLS"))


def _base_config(base: str):
    """The base model's transformers config, or an IterisError saying why there is none."""
    import transformers

    path = Path(base).expanduser()
    if path.exists() and not (path / "config.json").is_file():
        raise IterisError(f"--base {base}: the folder holds no config.json, so no model; give a folder written by "
                          "save_pretrained or a hub model id.")
    if not path.exists() and (base.startswith((".", "/", "~")) or base.count("/") > 1 or "\\" in base):
        raise IterisError(f"--base {base} does not exist; give a model folder or a hub model id.")
    try:
        return transformers.AutoConfig.from_pretrained(base)
    except (OSError, ValueError, KeyError) as err:
        raise IterisError(f"--base {base}: could not read a model config ({type(err).__name__}: {err}). Give a "
                          "folder written by save_pretrained, or a hub model id (online, or in the local cache)."
                          ) from err


def task_of(config) -> str | None:
    """The PEFT task_type matching a transformers config's first architecture (None: load the bare AutoModel)."""
    for arch in getattr(config, "architectures", None) or []:
        for suffix, task in _ARCHITECTURE_TASK:
            if arch.endswith(suffix):
                return task
        if arch.endswith("ForConditionalGeneration") and getattr(config, "is_encoder_decoder", False):
            return "SEQ_2_SEQ_LM"
    return None


def load_base(base: str, task_type: str | None, dtype: str = "float32"):
    """(model, tokenizer) from a local folder or a hub id, with the Auto class the adapters were trained for
    (task_type None: the one the base model's config names in `architectures`)."""
    import torch
    import transformers

    config = _base_config(base)
    task_type = task_type or task_of(config)
    auto = getattr(transformers, _AUTO_CLASS.get(task_type or "", "AutoModel"))
    try:
        model = auto.from_pretrained(base, dtype=getattr(torch, dtype))
        tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    except (OSError, ValueError, KeyError) as err:
        raise IterisError(f"--base {base}: could not load the model or its tokenizer with {auto.__name__} "
                          f"({type(err).__name__}: {err}).") from err
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval(), tokenizer


def _check_merge_args(args) -> None:
    """Everything that can be checked before loading anything slow."""
    from ..io.destination import ADAPTER_FILES, REPORT_FILES, check_destination
    from ..merge import METHODS

    # the destination rule up front: --out is no input, is writable, not locked, replaceable with --overwrite;
    # `produces` must list what cmd_merge writes (the adapter, and the report as an extra file)
    inputs = [*args.adapter, *(args.calibration or []), *([args.base] if Path(args.base).expanduser().exists() else [])]
    check_destination(args.out, args.overwrite, inputs=inputs, produces=ADAPTER_FILES + REPORT_FILES)
    if len(args.adapter) < 2:
        raise IterisError(f"merging needs at least two --adapter folders, got {len(args.adapter)}.")
    if args.method in ("iteris", "regmean") and not args.calibration:
        raise IterisError(f"--method {args.method} needs calibration data: one --calibration file per --adapter "
                          f"(or choose a data-free method: {', '.join(METHODS[2:])}).")
    if args.calibration and len(args.calibration) != len(args.adapter):
        raise IterisError(f"got {len(args.calibration)} --calibration files for {len(args.adapter)} --adapter folders.")
    if args.weights and len(args.weights) != len(args.adapter):
        raise IterisError(f"got {len(args.weights)} --weights for {len(args.adapter)} --adapter folders.")


def _task_type(adapters) -> str | None:
    types = {a.config.get("task_type") for a in adapters} - {None}
    if len(types) > 1:
        raise IterisError("the adapters were trained for different tasks (task_type " + ", ".join(
            f"{a.path}: {a.config.get('task_type')}" for a in adapters) + "); merge adapters of one task.")
    return types.pop() if types else None


def cmd_merge(args) -> dict:
    from ..adapters import load_adapter
    from ..io.calibration import read_inputs, tokenize
    from ..merge import merge_loras

    _check_merge_args(args)  # fail before the slow part
    records = [read_inputs(f) for f in args.calibration or []] if args.method in ("iteris", "regmean") else []
    adapters = [load_adapter(a) for a in args.adapter]
    task_type = _task_type(adapters) or task_of(_base_config(args.base))
    start = time.perf_counter()
    model, tokenizer = load_base(args.base, task_type, args.dtype)
    loaded = time.perf_counter()
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    calibration = [tokenize(tokenizer, r, args.batch_size, args.max_length, encoder_decoder) for r in records] or None
    result = merge_loras(model, adapters, calibration, method=args.method, max_iter=args.max_iter, alpha=args.alpha,
                         adaptive_weights=args.adaptive_weights, weights=args.weights, density=args.density,
                         modules=args.modules, seed=args.seed, progress=not args.quiet, schedule=args.schedule,
                         gram_dtype=args.gram_dtype)
    result.base_model = args.base
    result.task_type = task_type  # what the model was loaded as: the exported keys fit that Auto class
    export = result.save_adapter(args.out, rank=args.rank, overwrite=args.overwrite)
    report = result.report()
    report.update(base=args.base, out=export.path, ranks=export.ranks,
                  max_relative_error=export.max_relative_error,
                  timings={"load_seconds": loaded - start, "merge_seconds": result.seconds,
                           "total_seconds": time.perf_counter() - start})
    Path(args.out, "iteris_report.json").write_text(json.dumps(report, indent=2))
    print(f"{args.method}: merged {len(result.deltas)} layers of {len(adapters)} adapters in {result.seconds:.1f} s "
          f"-> {export.path} (task_type {task_type}; report: iteris_report.json)")
    return report


def add_parser(sub) -> None:
    from ..merge import METHODS

    merge = sub.add_parser("merge", help="merge PEFT LoRA adapters of one base model into one adapter",
                           description="Merge PEFT LoRA adapters; writes a PEFT adapter and iteris_report.json.")
    merge.add_argument("--base", required=True, help="base model folder or hub id")
    merge.add_argument("--adapter", action="append", required=True, help="PEFT LoRA folder (repeat, >= 2)")
    merge.add_argument("--calibration", action="append",
                       help="unlabeled inputs per adapter, same order: .txt (one per line) or .jsonl ({'text': ...})")
    merge.add_argument("--method", default="iteris", choices=METHODS,
                       help="iteris (default) and regmean need --calibration; the others are data-free")
    merge.add_argument("--schedule", default="sweep", choices=("sweep", "jacobi"),
                       help="iteris: 'sweep' (default) solves each layer once, from the merged model's own inputs: "
                            "the fixed point of the paper's loop in one pass; 'jacobi' runs the paper's --max-iter "
                            "solves")
    merge.add_argument("--max-iter", type=positive_int, default=10, help="IterIS solves with --schedule jacobi (default 10)")
    merge.add_argument("--gram-dtype", default="float32", choices=("float32", "float64"),
                       help="precision of the feature statistics (float64 for tiny --alpha with few samples)")
    merge.add_argument("--alpha", type=non_negative, default=1e-4, help="regularizer α of α‖M‖_F·I (default 1e-4)")
    merge.add_argument("--adaptive-weights", default="official", choices=("official", "paper", "none"),
                       help="iteris λ_i: 'official' (authors' code: W0 + ΔW_i), 'paper' (ΔW_i only) or 'none'")
    merge.add_argument("--weights", type=finite_float, nargs="+",
                       help="per-adapter multipliers (on λ_i for iteris/regmean, >= 0) or mixing weights")
    merge.add_argument("--density", type=fraction, default=0.5,
                       help="kept fraction in (0, 1] for ties/dare/magnitude_prune (default 0.5)")
    merge.add_argument("--modules", default="error", choices=("error", "intersection", "union"),
                       help="when adapters adapt different modules: refuse (default), merge the common ones, or all")
    merge.add_argument("--rank", type=positive_int, help="truncate the merged adapter to this rank (default: exact)")
    merge.add_argument("--batch-size", type=positive_int, default=8, help="calibration texts per batch (default 8)")
    merge.add_argument("--max-length", type=positive_int, default=128,
                       help="calibration texts are truncated to this many tokens (default 128)")
    merge.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                       help="dtype the base model is loaded in (default float32)")
    merge.add_argument("--seed", type=int, default=0, help="random seed (DARE) (default 0)")
    merge.add_argument("--out", required=True, help="output folder for the merged adapter (a new folder, or an "
                                                    "adapter folder to replace with --overwrite)")
    merge.add_argument("--overwrite", action="store_true",
                       help="replace --out if it is an existing adapter folder (swapped in atomically); other "
                            "folders are never replaced")
    merge.add_argument("--quiet", action="store_true", help="no progress bars")
    merge.set_defaults(func=cmd_merge)
