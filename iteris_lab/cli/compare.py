"""`iteris-lab compare`: the base model, each task's LoRA and every merged adapter, scored on every task's held-out
prompts by fidelity to that task's own LoRA (iteris_lab.tracks.own.compare); a table, and --json for the rows and
the per-prompt outcomes."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import IterisError
from .options import positive_int


def _check_compare_args(args) -> None:
    """Everything that can be checked before loading the base model."""
    if len(args.prompts) != len(args.adapter):
        raise IterisError(f"got {len(args.prompts)} --prompts files for {len(args.adapter)} --adapter folders; give "
                          "one prompt file per adapter, in the same order.")
    for path in args.prompts:
        if not Path(path).is_file():
            raise IterisError(f"--prompts {path} is not a file; give a .txt (one prompt per line) or .jsonl "
                              "({'text': ..., 'target': ...} per line) file.")
    for folder in [*args.adapter, *args.merged]:
        if not Path(folder).is_dir():
            raise IterisError(f"{folder} is not a folder; --adapter and --merged take PEFT adapter folders.")
    names = ["base"] + [Path(folder).resolve().name for folder in [*args.adapter, *args.merged]]
    twice = next((name for name in names if names.count(name) > 1), None)
    if twice is not None:
        raise IterisError(f"two models would be named {twice!r} (a model is named by its folder; 'base' is the base "
                          "model); rename or copy one folder.")
    if args.json:
        out = Path(args.json)
        if out.is_dir():
            raise IterisError(f"--json {args.json} is a folder; give a file name, e.g. {out / 'compare.json'}.")
        if not out.resolve().parent.is_dir():
            raise IterisError(f"--json {args.json}: the folder {out.parent} does not exist.")
        inputs = {Path(p).resolve() for p in args.prompts}
        if out.resolve() in inputs:
            raise IterisError(f"--json {args.json} is one of the --prompts files; give a new file name.")


def cmd_compare(args) -> dict:
    from ..io.peft import load_adapter
    from ..io.destination import write_text
    from ..tracks.own import compare
    from ..io.base_model import load_base, resolve_base
    from .merge import _task_type

    _check_compare_args(args)
    adapters = [load_adapter(a) for a in args.adapter]
    spec = resolve_base(args.base, adapters)  # no --base: the adapters' base_model_name_or_path, as `merge`
    model, tokenizer = load_base(spec, _task_type(adapters), args.dtype, quiet=args.quiet)
    result = compare(model, tokenizer, adapters, args.prompts, args.merged, limit=args.limit,
                     max_new_tokens=args.max_new_tokens, max_length=args.max_length, batch_size=args.batch_size,
                     chat_template=args.chat_template, progress=not args.quiet)
    print(result.table())
    out = result.to_json() | {"base": spec.recorded}
    if args.json:
        write_text(args.json, json.dumps(out, indent=2), inputs=[*args.adapter, *args.prompts, *args.merged])
        print(f"written to {args.json}")
    return out


def add_parser(sub) -> None:
    compare = sub.add_parser(
        "compare", help="score the base, each LoRA and merged adapters on every task's prompts",
        description="Score the base model, each task's LoRA and every --merged adapter on every task's held-out "
                    "prompts: agreement of greedy answers with the task's own LoRA, mean next-token KL to it, and "
                    "accuracy where the prompts have targets. Task names are the adapter folders' names.")
    compare.add_argument("--base", help="base model folder, .gguf file or hub id (default: the adapters' "
                                        "base_model_name_or_path, as in `iteris-lab merge`)")
    compare.add_argument("--adapter", action="append", required=True, help="a task's PEFT LoRA folder (repeat)")
    compare.add_argument("--prompts", action="append", required=True,
                         help="held-out prompts per --adapter, same order: .txt (one per line) or .jsonl "
                              "({'text': ..., 'target': ...}; target optional)")
    compare.add_argument("--merged", action="append", default=[], help="a merged adapter folder to score (repeat)")
    compare.add_argument("--json", help="write {'rows': [...], 'outcomes': [...]} here")
    compare.add_argument("--limit", type=positive_int, help="at most this many prompts per task (default: all)")
    compare.add_argument("--max-new-tokens", type=positive_int, default=16,
                         help="greedy tokens generated per prompt; the answer is the first line (default 16)")
    compare.add_argument("--max-length", type=positive_int, default=128, help="prompt tokens kept (default 128)")
    compare.add_argument("--batch-size", type=positive_int, default=8, help="prompts per batch (default 8)")
    compare.add_argument("--chat-template", action="store_true",
                         help="wrap each prompt as a user turn of the tokenizer's chat template")
    compare.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                         help="dtype the base model is loaded in (default float32)")
    compare.add_argument("--quiet", action="store_true", help="no progress bars")
    compare.set_defaults(func=cmd_compare)
