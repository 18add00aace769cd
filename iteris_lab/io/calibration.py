"""Calibration inputs from files: one text per line (.txt) or one JSON object per line (.jsonl), tokenized
with the base model's tokenizer into padded batches that merge_loras accepts.

A .jsonl line holds {"text": ...} (also "input" or "prompt"); encoder–decoder models may add {"target": ...}
for teacher forcing. Without a target the decoder is teacher-forced on the input text itself.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import CalibrationError

_TEXT_KEYS = ("text", "input", "prompt")


def read_inputs(path) -> list[dict]:
    """[{"text": str, "target": str | None}] from a .txt or .jsonl file; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"calibration file {path} does not exist.")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                item = json.loads(line)
                text = next(item[k] for k in _TEXT_KEYS if k in item)
            except (json.JSONDecodeError, StopIteration, TypeError) as err:
                raise CalibrationError(f"{path}:{number}: expected a JSON object with a 'text' field.") from err
            records.append({"text": str(text), "target": item.get("target")})
        else:
            records.append({"text": line, "target": None})
    if not records:
        raise CalibrationError(f"calibration file {path} has no inputs.")
    return records


def tokenize(tokenizer, records: list[dict], batch_size: int = 8, max_length: int = 128,
             encoder_decoder: bool = False) -> list[dict]:
    """Right-padded batches of input_ids + attention_mask (+ labels with -100 at padding for seq2seq)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batches = []
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        batch = dict(tokenizer([r["text"] for r in chunk], padding=True, truncation=True, max_length=max_length,
                               return_tensors="pt"))
        if encoder_decoder:
            targets = [r["target"] if r["target"] is not None else r["text"] for r in chunk]
            labels = tokenizer(text_target=targets, padding=True, truncation=True, max_length=max_length,
                               return_tensors="pt")
            batch["labels"] = labels["input_ids"].masked_fill(labels["attention_mask"] == 0, -100)
        batches.append(batch)
    return batches

