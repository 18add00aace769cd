"""Recipes and provenance (issue 20.4): `merge --config`, the model card and the report that reproduces a merge."""
from __future__ import annotations

import hashlib
import json
from dataclasses import fields

import pytest
import torch
import yaml
from safetensors.torch import load_file

from iteris_lab.cli import main, notes
from iteris_lab.cli.merge import METHODS
from iteris_lab.errors import IterisError
from iteris_lab.io.recipe import KEYS, SETTINGS_KEYS, TOKENIZE_KEYS, check_recipe, load_recipe
from iteris_lab.settings import METHODS as SETTINGS_METHODS
from iteris_lab.settings import MergeSettings
from tiny import WORDS, make_lora, saved_model


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Two adapters of a tiny llama, calibration files, and one merge written by the command line."""
    root = tmp_path_factory.mktemp("recipe")
    base, model = saved_model("llama", root / "base")
    for i in range(2):
        make_lora(model, root / f"a{i}", ["q_proj", "v_proj"], seed=i + 1)
        (root / f"cal{i}.txt").write_text("\n".join(" ".join(WORDS[(i * 7 + j + k) % 90] for k in range(5))
                                                    for j in range(6)))
    argv = ["merge", "--out", str(root / "first"), "--quiet", "--schedule", "jacobi", "--max-iter", "2",
            "--alpha", "1e-3", "--batch-size", "4"]
    for i in range(2):
        argv += ["--adapter", str(root / f"a{i}"), "--calibration", str(root / f"cal{i}.txt")]
    assert main(argv) == 0
    return root


def test_the_report_recipe_fed_back_gives_the_same_delta(made):
    report = json.loads((made / "first" / "iteris_report.json").read_text())
    recipe = made / "again.yaml"
    recipe.write_text(yaml.safe_dump(report["recipe"]))
    assert main(["merge", "--config", str(recipe), "--out", str(made / "second"), "--quiet"]) == 0
    first = load_file(made / "first" / "adapter_model.safetensors")
    second = load_file(made / "second" / "adapter_model.safetensors")
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key
    # and a different setting gives a different merge: the recipe is what decides
    recipe.write_text(yaml.safe_dump(report["recipe"] | {"alpha": 0.5}))
    assert main(["merge", "--config", str(recipe), "--out", str(made / "third"), "--quiet"]) == 0
    third = load_file(made / "third" / "adapter_model.safetensors")
    assert any(not torch.equal(first[k], third[k]) for k in first)


def test_the_report_starts_with_a_summary_and_names_lambdas(made):
    report = json.loads((made / "first" / "iteris_report.json").read_text())
    assert list(report)[:3] == ["format_version", "method", "summary"] and report["format_version"] == 2
    assert set(report["summary"]["tasks"]) == {"a0", "a1"} and len(report["summary"]["worst_layers"]) == 3
    assert "lambdas" in report["iterations"][0] and "weights" not in report["iterations"][0]
    assert report["recipe"]["schedule"] == "jacobi" and report["recipe"]["max_iter"] == 2


def test_the_model_card_names_every_input_with_its_checksum(made):
    card = (made / "first" / "README.md").read_text()
    report = json.loads((made / "first" / "iteris_report.json").read_text())
    for i in range(2):
        weights = hashlib.sha256((made / f"a{i}" / "adapter_model.safetensors").read_bytes()).hexdigest()
        calibration = hashlib.sha256((made / f"cal{i}.txt").read_bytes()).hexdigest()
        assert weights in card and calibration in card
    assert [c["samples"] for c in report["calibration"]] == [6, 6]
    assert all(c["tokens"] == 30 for c in report["calibration"])  # 6 texts of 5 words, one token each
    assert "PeftModel.from_pretrained" in card and "transformers" in card


def test_unknown_keys_and_bad_values_are_refused_with_the_fix(tmp_path):
    with pytest.raises(IterisError, match="unknown key 'alpah'; did you mean 'alpha'"):
        check_recipe({"adapters": ["a"], "alpah": 1e-3}, tmp_path)
    with pytest.raises(IterisError, match="alpha must be"):
        check_recipe({"alpha": -1.0}, tmp_path)
    with pytest.raises(IterisError, match="unknown schedule"):
        check_recipe({"schedule": "fast"}, tmp_path)
    with pytest.raises(IterisError, match="adapters must be a list of paths"):
        check_recipe({"adapters": "a0"}, tmp_path)
    with pytest.raises(IterisError, match="chat_template must be bool"):
        check_recipe({"chat_template": "yes"}, tmp_path)
    (tmp_path / "r.yaml").write_text("adapters: [x\n")
    with pytest.raises(IterisError, match="not valid YAML"):
        load_recipe(tmp_path / "r.yaml")


def test_paths_are_relative_to_the_recipe_and_the_command_line_wins(made, tmp_path, capsys):
    folder = tmp_path / "sub"
    folder.mkdir()
    (folder / "r.yaml").write_text(f"adapters: [{made / 'a0'}, ../x]\nmethod: ties\n")
    recipe = load_recipe(folder / "r.yaml")
    assert recipe["adapters"] == [str(made / "a0"), str(folder / "../x")]
    (folder / "r.yaml").write_text(f"adapters: [{made / 'a0'}, {made / 'a1'}]\nmethod: ties\n")
    assert main(["merge", "--config", str(folder / "r.yaml"), "--method", "linear", "--out", str(tmp_path / "o"),
                 "--quiet"]) == 0
    assert json.loads((tmp_path / "o" / "iteris_report.json").read_text())["method"] == "linear"
    assert main(["merge", "--config", str(folder / "r.yaml"), "--adapter", "x", "--out", str(tmp_path / "p")]) == 2
    assert "not both" in capsys.readouterr().err


def test_recipe_keys_cli_methods_and_notes_follow_merge_settings():
    names = {f.name for f in fields(MergeSettings)}
    tokenization = set(TOKENIZE_KEYS) & names  # MergeSettings' text settings are the recipe's tokenization keys
    assert tokenization == {"batch_size", "max_length", "chat_template"}
    assert set(SETTINGS_KEYS) | tokenization == names == set(notes.SETTINGS) | tokenization
    assert set(SETTINGS_KEYS) <= set(KEYS)
    assert METHODS == SETTINGS_METHODS


def test_repr_is_a_few_lines_and_the_history_is_a_table(made):
    import iteris_lab
    from tiny import merge_case

    case = merge_case("llama", made / "case", n_tasks=2)
    result = iteris_lab.merge_loras(case.model, case.adapters, case.calibration, schedule="jacobi", max_iter=3,
                                    progress=False)
    text = repr(result)
    assert len(text.splitlines()) <= 4 and len(text) < 600 and "iteris" in text
    table = result.history_table()
    rows = table.to_dict("records") if hasattr(table, "to_dict") else table
    assert len(rows) == 3 * len(result.deltas) * 2
    first = next(r for r in rows if r["iteration"] == 1)
    name = first["layer"]
    assert first["lambda"] == result.history[0].lambdas[name][0]
    assert first["objective"] == result.history[0].objective[name][0]
