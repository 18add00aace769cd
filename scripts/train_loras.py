"""Train the shipped task LoRAs: one PEFT folder (+ recipe.json, + head.safetensors for MiniLM) per task.

    python scripts/train_loras.py --model minilm    # all MiniLM tasks -> iteris_lab/data/adapters/minilm/<task>/
    python scripts/train_loras.py --model smollm2 --task addition --steps 100 --threads 1
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from iteris_lab.paths import data_dir  # noqa: E402
from iteris_lab.tracks.llm import tasks, training  # noqa: E402

RESULT_KEYS = ("train_time_s", "final_loss", "base_val_acc", "lora_val_acc", "base_test_acc", "lora_test_acc",
               "eval_time_s")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, choices=sorted(tasks.TRACKS))
    parser.add_argument("--task", action="append", help="task name (repeatable); default: every task of the track")
    parser.add_argument("--out", default=str(data_dir() / "adapters"),
                        help="root folder; adapters go to OUT/<model>/<task>/ (default: the package data)")
    parser.add_argument("--steps", type=int, help="override the recipe's number of steps")
    parser.add_argument("--lr", type=float, help="override the recipe's learning rate")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--rank", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--threads", type=int, help="torch threads (1 when other jobs share the cores)")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {k: v for k, v in {"steps": args.steps, "lr": args.lr, "batch_size": args.batch_size,
                                   "rank": args.rank, "seed": args.seed}.items() if v is not None}
    if "rank" in overrides:
        overrides["alpha"] = 2 * overrides["rank"]
    selected = tasks.load_tasks(args.model, args.task)
    records = training.train_track(args.model, selected, args.out, overrides=overrides)
    for name, rec in records.items():
        print(json.dumps({"task": name, **{k: rec[k] for k in RESULT_KEYS}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
