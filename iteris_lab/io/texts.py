"""Calibration given as texts: merge_loras(model, adapters, calibration=[[text, ...], ...], tokenizer=tok).

Per task, a list of strings or of {"text": str, "target": str | None} records (the records of
iteris_lab.io.calibration.read_inputs) becomes padded batches through iteris_lab.io.calibration.tokenize, with the
settings' max_length, batch_size and chat_template. Everything here is checked before the merge starts.
"""
from __future__ import annotations

import warnings

from ..errors import CalibrationError

_FIELDS = {"text", "target"}
DEFAULT_MAX_LENGTH = 128


def text_records(calibration, tokenizer) -> list[list[dict]] | None:
    """Per task, its texts as [{"text", "target"}] records; None when the calibration holds no texts (batches).

    Raises CalibrationError for texts without a tokenizer, texts mixed with batches, or a malformed record."""
    if calibration is None or isinstance(calibration, (str, dict)):
        return None
    calibration = calibration if isinstance(calibration, (list, tuple)) else None
    if calibration is None:
        return None  # a generator or loader of batches: read later by the merge, never texts
    kinds = [_kind(task) for task in calibration]
    if "texts" not in kinds:
        return None
    if "string" in kinds:
        task = kinds.index("string")
        raise CalibrationError(f"task {task}: the calibration is one string; give a list of texts per task, "
                               "e.g. calibration=[[text, ...], [text, ...]] (one inner list per adapter).")
    if "batches" in kinds:
        raise CalibrationError(f"tasks {_where(kinds, 'texts')} give texts but tasks {_where(kinds, 'batches')} "
                               "give batches; give every task texts, or every task tokenized batches.")
    if tokenizer is None:
        raise CalibrationError("the calibration is texts, so merge_loras needs the base model's tokenizer: pass "
                               "tokenizer=AutoTokenizer.from_pretrained(...) (or tokenized batches instead).")
    return [[_record(item, task, k) for k, item in enumerate(texts)] for task, texts in enumerate(calibration)]


def _kind(task) -> str:
    """'string' (one str where a list was due), 'texts' (a non-empty list of str / text records) or 'batches'."""
    if isinstance(task, str):
        return "string"
    if isinstance(task, (list, tuple)) and task and all(isinstance(x, str) or _is_record(x) for x in task):
        return "texts"
    return "batches"


def _is_record(item) -> bool:
    """A text record: a dict whose values are strings or None (a batch of model inputs holds tensors)."""
    return isinstance(item, dict) and bool(item) and all(v is None or isinstance(v, str) for v in item.values())


def _where(kinds: list[str], kind: str) -> str:
    return ", ".join(str(i) for i, k in enumerate(kinds) if k == kind)


def _record(item, task: int, index: int) -> dict:
    if isinstance(item, str):
        return {"text": item, "target": None}
    unknown = sorted(set(item) - _FIELDS)
    if unknown or not isinstance(item.get("text"), str):
        raise CalibrationError(f"task {task}, text {index}: a text record is {{'text': str, 'target': str or None}}, "
                               f"got keys {sorted(item)}" + (f" (unknown: {', '.join(unknown)})." if unknown else "."))
    return {"text": item["text"], "target": item.get("target")}


def tokenize_texts(model, tokenizer, texts: list[list[dict]], settings) -> list[list[dict]]:
    """Per task, padded batches of its texts (iteris_lab.io.calibration.tokenize, which leaves the user's tokenizer
    as it was) with the settings' max_length (clamped to the model's learned positions, with a warning when the
    user chose it), batch_size and chat_template."""
    from .base_model import position_limit
    from .calibration import tokenize

    encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    max_length = settings.max_length or DEFAULT_MAX_LENGTH
    positions = position_limit(model)
    if positions is not None and max_length > positions and settings.max_length is not None:
        warnings.warn(f"max_length {max_length} exceeds the model's {positions} learned positions; the calibration "
                      f"texts are truncated to {positions} tokens.", stacklevel=3)
    if positions is not None:
        max_length = min(max_length, positions)
    return [tokenize(tokenizer, records, settings.batch_size, max_length, encoder_decoder, settings.chat_template)
            for records in texts]
