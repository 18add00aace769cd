"""Calibration texts -> padded batches that merge_loras accepts.

read_inputs(path) reads one file per task:
- `.txt`: one text per line;
- `.jsonl`: one JSON object per line, {"text": ...} (also "input" or "prompt") and an optional {"target": ...};
- `.json`: one JSON array of strings or of such objects.
Suffixes are matched case-insensitively, a UTF-8 byte-order mark is skipped, blank lines are skipped, and a
line that cannot be read (bad encoding, bad JSON, a field that is not a string) is named in the error.

tokenize(tokenizer, records) turns texts (plain strings or {"text", "target"} records) into right-padded
batches of input_ids + attention_mask. A target is teacher-forced: encoder–decoder models get it as `labels`
(the text itself when there is none); decoder-only models read text and target as one sequence (text + " " +
target), the way they were trained on it. chat_template=True wraps each text as a user turn of the tokenizer's
chat template with the generation prompt (instruct LoRAs are trained that way), the target being the answer.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

from ..errors import CalibrationError

_TEXT_KEYS = ("text", "input", "prompt")
SUFFIXES = (".txt", ".jsonl", ".json")


def read_inputs(path, encoding: str = "utf-8") -> list[dict]:
    """[{"text": str, "target": str | None}] from a .txt, .jsonl or .json file (see the module docstring)."""
    path = Path(path)
    if path.is_dir():
        raise CalibrationError(f"calibration file {path} is a folder; give one file per adapter (.txt, .jsonl or "
                               ".json).")
    if not path.is_file():
        raise CalibrationError(f"calibration file {path} does not exist.")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise CalibrationError(f"calibration file {path}: unknown suffix {path.suffix!r}; use .txt (one text per "
                               "line), .jsonl (one {\"text\": ...} object per line) or .json (an array of texts).")
    text = _decode(path, encoding)
    if suffix == ".json":
        records = _json_records(path, text)
    else:
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                records.append(_jsonl_record(path, number, line) if suffix == ".jsonl" else
                               {"text": line, "target": None})
    if not records:
        raise CalibrationError(f"calibration file {path} has no inputs.")
    return records


def _decode(path: Path, encoding: str) -> str:
    data = path.read_bytes()
    codec = "utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding
    try:
        return data.decode(codec)
    except LookupError as err:
        raise CalibrationError(f"unknown text encoding {encoding!r}; give a Python codec name such as utf-8 or "
                               "latin-1.") from err
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise CalibrationError(f"{path}:{line}: not valid {encoding} (byte 0x{data[err.start]:02x}); save the file "
                               "as UTF-8, or pass its encoding (--encoding latin-1, encoding=...).") from err


def _field(where: str, item: dict, key: str, required: bool):
    value = item.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise CalibrationError(f"{where}: \"{key}\" must be a string, got {type(value).__name__} {value!r:.40}.")
    return value


def _record(where: str, item) -> dict:
    """{"text", "target"} from a string or a JSON object, with both fields' types checked."""
    if isinstance(item, str):
        return {"text": item, "target": None}
    if not isinstance(item, dict):
        raise CalibrationError(f"{where}: expected a JSON object with a \"text\" field (or a string), got "
                               f"{type(item).__name__}.")
    key = next((k for k in _TEXT_KEYS if k in item), None)
    if key is None:
        raise CalibrationError(f"{where}: the object has no \"text\" field (also accepted: \"input\", \"prompt\").")
    return {"text": _field(where, item, key, True), "target": _field(where, item, "target", False)}


def _jsonl_record(path: Path, number: int, line: str) -> dict:
    try:
        item = json.loads(line)
    except json.JSONDecodeError as err:
        raise CalibrationError(f"{path}:{number}: not valid JSON ({err.msg}); each line of a .jsonl file is one "
                               "object such as {\"text\": \"...\"}.") from err
    if isinstance(item, str):  # a bare JSON string is a text too, but only objects are documented
        raise CalibrationError(f"{path}:{number}: expected a JSON object with a \"text\" field, got a string.")
    return _record(f"{path}:{number}", item)


def _json_records(path: Path, text: str) -> list[dict]:
    try:
        items = json.loads(text)
    except json.JSONDecodeError as err:
        raise CalibrationError(f"{path}:{err.lineno}: not valid JSON ({err.msg}); a .json calibration file is one "
                               "array of texts or {\"text\": ...} objects (or use .jsonl, one object per line)."
                               ) from err
    if not isinstance(items, list):
        raise CalibrationError(f"{path}: expected a JSON array of texts or {{\"text\": ...}} objects, got "
                               f"{type(items).__name__}.")
    return [_record(f"{path}: item {i}", item) for i, item in enumerate(items)]


def as_records(texts) -> list[dict]:
    """Plain strings and {"text", "target"} dicts as checked records (the types merge_loras accepts as texts)."""
    if isinstance(texts, (str, bytes)) or not hasattr(texts, "__iter__"):
        raise CalibrationError(f"calibration texts must be a list of strings or {{\"text\": ...}} records, got "
                               f"{type(texts).__name__}.")
    return [_record(f"calibration text {i}", item) for i, item in enumerate(texts)]


def chat_prompt(tokenizer, text: str) -> str:
    """`text` as a user turn of the tokenizer's chat template, followed by the assistant's generation prompt."""
    if not getattr(tokenizer, "chat_template", None):
        raise CalibrationError("chat_template=True (--chat-template), but the tokenizer has no chat template; "
                               "drop the option, or use the instruct model's tokenizer.")
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)


@contextmanager
def _padding_token(tokenizer, batch_size: int):
    """A pad token for the duration of the call (the eos token when there is none); the tokenizer the caller
    owns is given back unchanged."""
    if tokenizer.pad_token is not None:
        yield
        return
    if tokenizer.eos_token is None:
        if batch_size > 1:
            raise CalibrationError("the tokenizer has neither a pad token nor an eos token, so texts of different "
                                   "lengths cannot share a batch; set tokenizer.pad_token, or use batch_size=1 "
                                   "(--batch-size 1).")
        yield
        return
    tokenizer.pad_token = tokenizer.eos_token
    try:
        yield
    finally:
        tokenizer.pad_token = None


def _decoder_text(record: dict, chat_template: bool, tokenizer) -> str:
    text = chat_prompt(tokenizer, record["text"]) if chat_template else record["text"]
    target = record["target"]
    if target is None:
        return text
    return text + target if chat_template or text[-1:].isspace() else f"{text} {target}"


def tokenize(tokenizer, records, batch_size: int = 8, max_length: int = 128, encoder_decoder: bool = False,
             chat_template: bool = False) -> list[dict]:
    """Calibration batches for one task from texts.

    records: strings or {"text": str, "target": str | None} dicts (as read_inputs returns).
    Returns a list of dicts: input_ids and attention_mask (batch, ≤ max_length), right-padded; for encoder–decoder
    models also labels (batch, ≤ max_length) with -100 at padding. Padding positions (attention_mask 0, labels
    -100) never enter the merge's statistics."""
    records = as_records(records)
    if not records:
        raise CalibrationError("no calibration texts: give at least one per task.")
    batches = []
    special = {"add_special_tokens": False} if chat_template else {}  # the template already holds them
    with _padding_token(tokenizer, batch_size):
        for start in range(0, len(records), batch_size):
            chunk = records[start:start + batch_size]
            if encoder_decoder:
                texts = [chat_prompt(tokenizer, r["text"]) if chat_template else r["text"] for r in chunk]
            else:
                texts = [_decoder_text(r, chat_template, tokenizer) for r in chunk]
            batch = dict(tokenizer(texts, padding=len(chunk) > 1, truncation=True, max_length=max_length,
                                   return_tensors="pt", **special))
            if encoder_decoder:
                targets = [r["target"] if r["target"] is not None else r["text"] for r in chunk]
                labels = tokenizer(text_target=targets, padding=len(chunk) > 1, truncation=True,
                                   max_length=max_length, return_tensors="pt")
                batch["labels"] = labels["input_ids"].masked_fill(labels["attention_mask"] == 0, -100)
            batches.append(batch)
    return batches


def token_count(batches: list[dict]) -> int:
    """Real (non-padding) input tokens in tokenized batches."""
    return int(sum(int(b["attention_mask"].sum()) for b in batches))
