"""Merge recipes: one YAML (or JSON) file that holds everything a merge was made from.

    base: HuggingFaceTB/SmolLM2-135M-Instruct    # optional: default, the adapters' base_model_name_or_path
    adapters: [lora/addition, lora/subtraction]  # paths relative to the recipe file
    calibration: [addition.txt, subtraction.txt] # one file per adapter (iteris, regmean)
    method: iteris
    schedule: sweep                              # ... any field of MergeSettings
    max_length: 128                              # tokenization: batch_size, max_length, chat_template, encoding
    rank: null                                   # export: rank; dtype of the loaded base

`iteris-lab merge --config recipe.yaml --out merged` runs it; options given on the command line win over the
recipe. Every merge's iteris_report.json holds the recipe that reproduces it (absolute paths), under "recipe".
Unknown keys are refused (with the closest valid name), values are checked like MergeSettings.
"""
from __future__ import annotations

import difflib
import json
from dataclasses import fields
from pathlib import Path

from ..errors import IterisError

# The merge's own choices: MergeSettings' fields (kept in step with settings.py by tests/test_recipe.py).
SETTINGS_KEYS = ("method", "schedule", "max_iter", "alpha", "adaptive_weights", "density", "regmean_shrink",
                 "modules", "tol", "seed", "gram_dtype", "weights")
INPUT_KEYS = ("base", "adapters", "calibration")
TOKENIZE_KEYS = ("batch_size", "max_length", "chat_template", "encoding")
EXPORT_KEYS = ("rank", "dtype")
KEYS = INPUT_KEYS + SETTINGS_KEYS + TOKENIZE_KEYS + EXPORT_KEYS
RECIPE_VERSION = 1
_TYPES = {"base": (str,), "batch_size": (int,), "max_length": (int,), "chat_template": (bool,), "encoding": (str,),
          "rank": (int,), "dtype": (str,)}


def closest(name: str, valid) -> str:
    """ "; did you mean 'x'?" for the nearest valid name, or "" when none is close."""
    match = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.6)
    return f"; did you mean {match[0]!r}?" if match else ""


def load_recipe(path) -> dict:
    """The recipe in `path` (.yaml, .yml or .json) as {key: value}, paths resolved against the recipe's folder."""
    path = Path(path)
    if not path.is_file():
        raise IterisError(f"--config {path}: {'is a folder, not a recipe file' if path.is_dir() else 'does not exist'}"
                          "; give a .yaml or .json recipe.")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise IterisError(f"--config {path}: not UTF-8 text ({err.reason}).") from err
    data = _parse(path, text)
    return check_recipe(data, path.parent, str(path))


def _parse(path: Path, text: str):
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise IterisError(f"{path}:{err.lineno}: not valid JSON ({err.msg}).") from err
    if path.suffix.lower() not in (".yaml", ".yml"):
        raise IterisError(f"--config {path}: unknown suffix {path.suffix!r}; a recipe is .yaml, .yml or .json.")
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise IterisError(f"{path}{where}: not valid YAML ({getattr(err, 'problem', None) or err}).") from err


def check_recipe(data, folder: Path, where: str = "recipe") -> dict:
    """Refuse unknown keys and wrongly typed values; resolve adapter and calibration paths against `folder`;
    check the merge settings by building MergeSettings from them."""
    if not isinstance(data, dict):
        raise IterisError(f"{where}: expected a mapping of settings (key: value), got {type(data).__name__}.")
    data = dict(data)
    version = data.pop("recipe_version", RECIPE_VERSION)
    if version != RECIPE_VERSION:
        raise IterisError(f"{where}: recipe_version {version!r} is not supported (this iteris-lab reads "
                          f"{RECIPE_VERSION}).")
    for key in data:
        if key not in KEYS:
            raise IterisError(f"{where}: unknown key {key!r}{closest(str(key), KEYS)} (valid keys: {', '.join(KEYS)}).")
    for key, types in _TYPES.items():
        value = data.get(key)
        if value is not None and (not isinstance(value, types) or (bool in types) != isinstance(value, bool)):
            raise IterisError(f"{where}: {key} must be {types[0].__name__}, got {value!r}.")
    for key in ("adapters", "calibration"):
        value = data.get(key)
        if value is None:
            continue
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise IterisError(f"{where}: {key} must be a list of paths, got {value!r}.")
        data[key] = [str((folder / Path(v).expanduser())) for v in value]
    base = data.get("base")
    if base and not Path(base).expanduser().is_absolute() and (folder / base).exists():
        data["base"] = str(folder / base)  # a local model next to the recipe; otherwise a hub id
    for key in ("rank", "batch_size", "max_length"):
        if data.get(key) is not None and data[key] < 1:
            raise IterisError(f"{where}: {key} must be >= 1, got {data[key]}.")
    from ..settings import MergeSettings  # checks every setting the way merge_loras will

    MergeSettings(**{k: data[k] for k in SETTINGS_KEYS if data.get(k) is not None})
    return data


def settings_field_names() -> tuple[str, ...]:
    from ..settings import MergeSettings

    return tuple(f.name for f in fields(MergeSettings))


def recipe_text(recipe: dict) -> str:
    """The recipe as YAML, the keys in the documented order."""
    import yaml

    ordered = {"recipe_version": RECIPE_VERSION} | {k: recipe[k] for k in KEYS if k in recipe}
    return yaml.safe_dump(ordered, sort_keys=False, allow_unicode=True)
