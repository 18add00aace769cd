"""`iteris-lab merge` on tiny models saved to a temp dir (the same from_pretrained path as hub ids)."""
import json

import pytest
from peft import PeftModel

from iteris_lab.cli import build_parser, load_base, main
from tiny import TARGETS, WORDS, make_lora, save_tiny, save_tokenizer

@pytest.fixture(params=["llama", "t5"])
def setup(request, tmp_path):
    kind = request.param
    base = save_tiny(kind, tmp_path / "base")
    save_tokenizer(base)
    task_type = "CAUSAL_LM" if kind == "llama" else "SEQ_2_SEQ_LM"
    model, _ = load_base(base, task_type)
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
    assert report["max_relative_error"] == 0.0 and report["timings"]["merge_seconds"] > 0
    assert set(report["iterations"][0]["weights"]) == set(report["ranks"])
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
