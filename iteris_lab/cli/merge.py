"""`iteris-lab merge`: find and load the base model, read the adapters and calibration files, merge, and write
the adapter with its model card (README.md) and report (iteris_report.json), all three in one atomic swap.

Options come from the command line, a recipe (--config, io/recipe.py) and DEFAULTS, in that order of precedence.
Settings that cannot take effect with the chosen method are named in a note (cli/notes.py); bad input is one
line on stderr and exit code 2, raised where it arises.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from dataclasses import fields
from typing import get_args

from ..errors import IterisError
from ..io.base_model import task_of  # noqa: F401  (kept importable from here)
from ..settings import JACOBI_SOLVES, METHODS, GramDtype, LambdaVariant, MergeSettings, ModulePolicy, Schedule
from . import notes
from .options import finite_float, fraction, non_negative, positive_int

# MergeSettings' defaults (settings.py imports no torch, so --help stays fast), and the command's own options
DEFAULTS = {f.name: f.default for f in fields(MergeSettings)} | dict(
    max_length=128, rank=None, encoding="utf-8", dtype="float32", base=None, adapters=None, calibration=None)


CARD_FILES = ("README.md",)  # the model card cmd_merge writes beside the adapter and report


def load_base(base, task_type: str | None = None, dtype: str = "float32", quiet: bool = True):
    """(model, tokenizer) of a base model: a folder, .gguf file or hub id, or an io.base_model.BaseSpec."""
    from ..io.base_model import BaseSpec, load_base as load, resolve_base

    return load(base if isinstance(base, BaseSpec) else resolve_base(str(base), []), task_type, dtype, quiet=quiet)


def _local_base(base) -> list[str]:
    """[the base model's path] when it is a local file or folder (an input no output may touch), else []."""
    return [base] if base is not None and Path(base).expanduser().exists() else []



def _check_merge_args(args) -> None:
    """Everything that can be checked before loading anything slow."""
    from ..io.destination import ADAPTER_FILES, REPORT_FILES, check_destination

    # the destination rule up front: --out is no input, is writable, not locked, replaceable with --overwrite;
    # `produces` must list what cmd_merge writes (the adapter, and the report as an extra file)
    inputs = [*args.adapter, *(args.calibration or []), *_local_base(args.base)]
    check_destination(args.out, args.overwrite, inputs=inputs, produces=ADAPTER_FILES + REPORT_FILES + CARD_FILES)
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


def resolve_options(args) -> dict:
    """{option: value} from the command line over the recipe over DEFAULTS; `args` gets the merged values too
    (adapter, calibration, method, weights, ...) and `args.given` the names the user chose (line or recipe)."""
    from ..io.recipe import load_recipe

    recipe = load_recipe(args.config) if args.config else {}
    if recipe and (args.adapter or args.calibration):
        raise IterisError("give the adapters and calibration files in the recipe (--config) or with --adapter / "
                          "--calibration, not both.")
    line = {k: getattr(args, k) for k in DEFAULTS if getattr(args, k, None) not in (None, False)}
    line |= {k: v for k, v in (("adapters", args.adapter), ("calibration", args.calibration)) if v}
    values = DEFAULTS | recipe | line
    if not values["adapters"]:
        raise IterisError("no adapters: give --adapter FOLDER (twice or more) or a recipe with --config.")
    for key, value in values.items():
        setattr(args, key, value)
    # a recipe written by a report spells out every default: only values that differ count as chosen
    chosen = {k for k, v in recipe.items() if k not in DEFAULTS or v != DEFAULTS[k]} | set(line)
    args.adapter, args.given = values["adapters"], chosen - {"adapters"}
    return values


def _read_calibration(args) -> list[list[dict]]:
    from ..io.calibration import read_inputs

    if args.method not in notes.SOLVED or not args.calibration:
        return []
    return [read_inputs(f, args.encoding) for f in args.calibration]


def _tokenize(args, model, tokenizer, records) -> list:
    from ..io.base_model import position_limit
    from ..io.calibration import tokenize

    limit = position_limit(model)
    if records and limit is not None and args.max_length > limit:
        if "max_length" in args.given:  # the default simply adapts to a short model
                notes.note(f"--max-length {args.max_length} is beyond the {limit} positions the model has learned; "
                       f"texts are truncated to {limit} tokens.")
        args.max_length = limit
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    return [tokenize(tokenizer, r, args.batch_size, args.max_length, encoder_decoder, args.chat_template)
            for r in records]


def _export_rank(result, requested: int | None) -> int | None:
    """The rank to write: `requested`, or None (the exact factors) when it is not below the exact rank."""
    from ..measure import numerical_rank

    if requested is None:
        return None
    exact = {name: (result.factors[name][1].shape[0] if name in result.factors else
                    numerical_rank(delta.reshape(result.layers[name].matrix_shape())))
             for name, delta in result.deltas.items()}
    top = max(exact.values())
    if requested >= top:
        notes.note(f"--rank {requested} is not below the merge's exact rank ({top}): the exact adapter is written "
                   "(a higher rank would only add zero directions).")
        return None
    lower = [n for n, r in exact.items() if r < requested]
    if lower:
        notes.note(f"{len(lower)} modules have an exact rank below --rank {requested} (e.g. {lower[0]}: "
                   f"{exact[lower[0]]}); they are written at --rank with directions of zero weight.")
    return requested


def _provenance(args, result, records, batches, rank, export_plan, timings) -> dict[str, str]:
    """{"README.md": card, "iteris_report.json": report} for the output folder."""
    from ..io.calibration import token_count
    from ..io.model_card import CalibrationFile, adapter_entry, build_report, model_card

    recipe = {k: getattr(args, k) for k in DEFAULTS}
    recipe |= {"adapters": [str(Path(a).resolve()) for a in args.adapter],
               "calibration": [str(Path(c).resolve()) for c in args.calibration] if records else None,
               "base": args.base if args.base is None or not Path(args.base).expanduser().exists()
               else str(Path(args.base).expanduser().resolve())}
    calibration = [CalibrationFile(f, len(r), token_count(b)).entry()
                   for f, r, b in zip(args.calibration or [], records, batches)]
    errors = {n: f[2] for n, f in export_plan.items()}
    export = {"requested_rank": rank, "ranks": {n: int(f[1].shape[0]) for n, f in export_plan.items()},
              "relative_error": errors, "max_relative_error": max(errors.values())}
    report = build_report(result, recipe, [adapter_entry(a) for a in args.adapter], calibration, export, timings)
    return {"README.md": model_card(report), "iteris_report.json": json.dumps(report, indent=1)}


def cmd_merge(args) -> dict:
    from ..io.peft import load_adapter
    from ..io.base_model import base_config, resolve_base
    from ..io.export import lora_factors
    from ..merge import merge_loras

    resolve_options(args)
    records = _read_calibration(args)  # plain file reading, before torch is even imported
    _check_merge_args(args)  # fail before the slow part
    notes.unused_settings(args.method, args.given, args.schedule)
    adapters = [load_adapter(a) for a in args.adapter]
    spec = resolve_base(args.base, adapters)
    task_type = _task_type(adapters)
    if task_type is None:
        config = base_config(spec)
        task_type = task_of(config) if config is not None else "CAUSAL_LM"  # a GGUF holds a causal LM
    start = time.perf_counter()
    model, tokenizer = load_base(spec, task_type, args.dtype, quiet=args.quiet)
    loaded = time.perf_counter()
    batches = _tokenize(args, model, tokenizer, records)
    unused = notes.unused(args.method, args.given, args.schedule)  # named in the note above, not passed on
    settings = {k: getattr(args, k) for k in notes.SETTINGS if k not in unused}
    result = merge_loras(model, adapters, batches or None, progress=not args.quiet, **settings)
    result.base_model = spec.recorded  # the adapters' base id, not a local path or cache folder
    result.task_type = task_type  # what the model was loaded as: the exported keys fit that Auto class
    rank = _export_rank(result, args.rank)
    plan = lora_factors(result.deltas, result.factors, result.layers, rank)
    timings = {"load_seconds": loaded - start, "merge_seconds": result.seconds}
    files = _provenance(args, result, records, batches, rank, plan, timings)
    export = _save(result, args, rank, files)
    ranks = sorted(set(export.ranks.values()))
    rank_text = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
    print(f"{args.method}: merged {len(result.deltas)} layers of {len(adapters)} adapters in {result.seconds:.1f} s "
          f"-> {export.path} (rank {rank_text} {'exact' if rank is None else 'truncated'}, truncation error "
          f"{export.max_relative_error:.2g}; task_type {task_type}; README.md, iteris_report.json)")
    return json.loads(files["iteris_report.json"])


def _save(result, args, rank, files):
    """save_adapter, with a failed write (disk full, no permission) as one IterisError naming the folder."""
    from safetensors import SafetensorError

    try:
        return result.save_adapter(args.out, rank=rank, overwrite=args.overwrite, extra_files=files,
                                   inputs=[*(args.calibration or []), *_local_base(args.base)])
    except (SafetensorError, OSError) as err:  # safetensors reports a full disk as its own error type
        raise IterisError(f"could not write the merged adapter to {args.out} ({err}); nothing was replaced. Free "
                          "some space or choose another --out.") from err


def add_parser(sub) -> None:
    d = DEFAULTS
    merge = sub.add_parser(
        "merge", help="merge PEFT LoRA adapters of one base model into one adapter",
        description="Merge PEFT LoRA adapters; writes a PEFT adapter, a README.md model card and "
                    "iteris_report.json (with the recipe that reproduces the merge).",
        epilog="Without --base, the base model is the one the adapters record (base_model_name_or_path). "
               "`iteris-lab models` lists the base models available offline.")
    merge.add_argument("--config", help="a recipe (.yaml or .json) with base, adapters, calibration, method and "
                                        "settings; options given here win over it")
    merge.add_argument("--base", help="base model folder, .gguf file or hub id (default: the adapters' base)")
    merge.add_argument("--adapter", action="append", help="PEFT LoRA folder (repeat, >= 2)")
    merge.add_argument("--calibration", action="append",
                       help="unlabeled inputs per adapter, same order: .txt (one per line), .jsonl "
                            "({'text': ..., 'target': ...} per line) or .json (an array)")
    merge.add_argument("--method", choices=METHODS,
                       help="iteris (default) and regmean need --calibration; the others are data-free")
    merge.add_argument("--schedule", choices=get_args(Schedule),
                       help="iteris: 'sweep' (default) solves each layer once, from the merged model's own inputs: "
                            "the fixed point of the paper's loop in one pass; 'jacobi' runs the paper's --max-iter "
                            "solves")
    merge.add_argument("--max-iter", type=positive_int,
                       help=f"IterIS solves with --schedule jacobi (default {JACOBI_SOLVES})")
    merge.add_argument("--gram-dtype", choices=get_args(GramDtype),
                       help="precision of the feature statistics (float64 for tiny --alpha with few samples)")
    merge.add_argument("--alpha", type=non_negative, help=f"regularizer α of α‖M‖_F·I (default {d['alpha']:g})")
    merge.add_argument("--adaptive-weights", choices=get_args(LambdaVariant),
                       help="iteris λ_i: 'official' (default; authors' code: W0 + ΔW_i), 'paper' (ΔW_i) or 'none'")
    merge.add_argument("--weights", type=finite_float, nargs="+",
                       help="per-adapter multipliers (on λ_i for iteris/regmean, >= 0) or mixing weights")
    merge.add_argument("--density", type=fraction,
                       help=f"kept fraction in (0, 1] for ties/dare/magnitude_prune (default {d['density']:g})")
    merge.add_argument("--modules", choices=get_args(ModulePolicy),
                       help="when adapters adapt different modules: refuse (default), merge the common ones, or all")
    merge.add_argument("--rank", type=positive_int, help="truncate the merged adapter to this rank (default: exact)")
    merge.add_argument("--batch-size", type=positive_int,
                       help=f"calibration texts per batch (default {d['batch_size']})")
    merge.add_argument("--max-length", type=positive_int,
                       help="calibration texts are truncated to this many tokens (default 128)")
    merge.add_argument("--chat-template", action="store_true",
                       help="wrap each calibration text in the tokenizer's chat template as a user turn (instruct "
                            "LoRAs are trained that way)")
    merge.add_argument("--encoding", help="text encoding of the calibration files (default utf-8)")
    merge.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                       help="dtype the base model is loaded in (default float32)")
    merge.add_argument("--seed", type=int, help="random seed of DARE's drops (default 0)")
    merge.add_argument("--out", required=True, help="output folder for the merged adapter (a new folder, or an "
                                                    "adapter folder to replace with --overwrite)")
    merge.add_argument("--overwrite", action="store_true",
                       help="replace --out if it is an existing adapter folder (swapped in atomically); other "
                            "folders are never replaced")
    merge.add_argument("--quiet", action="store_true", help="no progress bars or status lines (notes stay)")
    merge.set_defaults(func=cmd_merge)
