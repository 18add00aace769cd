"""Issue 18: every foreseeable failure of `iteris-lab merge` is one line on stderr and exit code 2, raised where it
arises — checked through the real command in a subprocess (no traceback, no output folder left behind).

Each row of BAD_INPUTS failed before this test existed: a traceback (exit 1), a misleading message, or a merge
computed from misread data."""
from __future__ import annotations

import json
import os
import pickle
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from iteris_lab.errors import CalibrationError
from iteris_lab.io.calibration import read_inputs, tokenize
from tiny import WORDS, load_tiny, make_lora, save_tiny, save_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def command() -> list[str]:
    """The installed `iteris-lab` script when there is one (it imports this checkout through PYTHONPATH)."""
    script = shutil.which("iteris-lab")
    return [script] if script else [sys.executable, "-m", "iteris_lab"]


def run(args, cwd, limit_bytes: int | None = None, **env) -> subprocess.CompletedProcess:
    environ = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1",
                            "PYTHONWARNINGS": "ignore"} | env

    def limit():  # a disk that fills: writes beyond limit_bytes fail with EFBIG (Python ignores SIGXFSZ)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.run(command() + list(args), cwd=cwd, env=environ, capture_output=True, text=True,
                          timeout=300, preexec_fn=limit if limit_bytes else None)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return build_world(tmp_path_factory.mktemp("world"))


def build_world(root: Path) -> Path:
    """A tiny llama base (+ broken copies), two adapters that record it, calibration files good and bad."""
    os.chdir(root)  # the adapters record the base as "base", relative, as a user's would
    try:
        save_tiny("llama", "base")
        save_tokenizer("base")
        model = load_tiny("llama", "base")
        for i in range(2):
            make_lora(model, f"a{i}", ["q_proj", "v_proj"], seed=i + 1)
            lines = (" ".join(WORDS[(i * 5 + j + k) % len(WORDS)] for k in range(4)) for j in range(4))
            Path(f"cal{i}.txt").write_text("\n".join(lines))
    finally:
        os.chdir(ROOT)
    _broken_files(root)
    return root


def _broken_files(root: Path) -> None:
    from safetensors.torch import load_file, save_file

    (root / "latin1.txt").write_bytes(b"w3 w4\nw5 w6\ncaf\xe9 w7\n")
    (root / "number.jsonl").write_text('{"text": "w3 w4"}\n{"text": "w5", "target": 5}\n')
    (root / "null.jsonl").write_text('{"text": null}\n')
    (root / "list.JSONL").write_text('{"text": ["w3", "w4"]}\n')
    (root / "object.json").write_text('{"text": "w3 w4"}')
    (root / "table.csv").write_text("text\nw3 w4\n")
    (root / "calfolder").mkdir()
    (root / "notes.txt").write_text("not a model")
    (root / "recipe.yaml").write_text("adapters: [a0, a1]\ncalibration: [cal0.txt, cal1.txt]\nalpah: 0.001\n")
    for name in ("corrupt", "missing", "pickled", "nopad"):
        shutil.copytree(root / "base", root / name)
    weights = (root / "corrupt" / "model.safetensors").read_bytes()
    (root / "corrupt" / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    state = load_file(root / "missing" / "model.safetensors")
    state.pop("model.layers.1.mlp.up_proj.weight")
    save_file(state, root / "missing" / "model.safetensors", metadata={"format": "pt"})
    (root / "pickled" / "model.safetensors").unlink()
    with open(root / "pickled" / "pytorch_model.bin", "wb") as handle:
        pickle.dump({"weight": _Payload()}, handle)
    config = json.loads((root / "nopad" / "tokenizer_config.json").read_text())
    for key in ("pad_token", "eos_token"):
        config.pop(key, None)
    (root / "nopad" / "tokenizer_config.json").write_text(json.dumps(config))
    shutil.copytree(root / "a1", root / "other")
    config = json.loads((root / "other" / "adapter_config.json").read_text())
    (root / "other" / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": "x/y"}))


class _Payload:
    """A pickle that would create a file if it were ever unpickled without weights_only."""

    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def merge(*extra, adapters=("a0", "a1"), calibration=("cal0.txt", "cal1.txt")) -> list[str]:
    argv = ["merge", "--out", "out", "--quiet"]
    for a in adapters:
        argv += ["--adapter", a]
    for c in calibration:
        argv += ["--calibration", c]
    return argv + list(extra)


# (case, argv, what the one line must say)
BAD_INPUTS = [
    ("non-UTF-8 calibration file", merge(calibration=("latin1.txt", "cal1.txt")), "latin1.txt:3: not valid utf-8"),
    ("numeric target", merge(calibration=("number.jsonl", "cal1.txt")), 'number.jsonl:2: "target" must be a string'),
    ("null text", merge(calibration=("null.jsonl", "cal1.txt")), 'null.jsonl:1: "text" must be a string'),
    ("list text, upper-case suffix", merge(calibration=("list.JSONL", "cal1.txt")), '"text" must be a string'),
    (".json that is no array", merge(calibration=("object.json", "cal1.txt")), "expected a JSON array"),
    ("unknown suffix", merge(calibration=("table.csv", "cal1.txt")), "unknown suffix '.csv'"),
    ("calibration folder", merge(calibration=("calfolder", "cal1.txt")), "calfolder is a folder"),
    ("unknown encoding", merge("--encoding", "klingon"), "unknown text encoding 'klingon'"),
    ("corrupt base checkpoint", merge("--base", "corrupt"), "Check that the checkpoint is complete"),
    ("pickled base checkpoint", merge("--base", "pickled"), "does not unpickle them"),
    ("base with missing weights", merge("--base", "missing"), "1 weights are missing from the checkpoint"),
    ("tokenizer without pad and eos", merge("--base", "nopad"), "neither a pad token nor an eos token"),
    ("base that is a plain file", merge("--base", "notes.txt"), "notes.txt is a file"),
    ("unreachable hub id", merge("--base", "nobody/no-such-model"), "the hub is not reachable"),
    ("adapters of different bases", merge(adapters=("a0", "other")), "record different base models"),
    ("recipe with a typo", ["merge", "--config", "recipe.yaml", "--out", "out"], "did you mean 'alpha'"),
]


@pytest.mark.parametrize("case, argv, message", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_one_line_and_exit_2(world, case, argv, message):
    done = run(argv, world)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and lines[0].startswith("iteris-lab merge: error: "), done.stderr
    assert message in lines[0]
    assert "Traceback" not in done.stderr
    assert not (world / "out").exists() and not (world / "PWNED").exists()


def test_a_disk_that_fills_during_the_save_is_one_line_and_leaves_nothing(world):
    done = run(merge(), world, limit_bytes=4096)
    assert done.returncode == 2, done.stderr
    (line,) = [line for line in done.stderr.splitlines() if line.strip()]
    assert "could not write the merged adapter to out" in line and "nothing was replaced" in line
    assert not [p for p in world.iterdir() if p.name.startswith(("out", ".out"))]


def test_bom_upper_case_suffix_and_a_long_max_length_merge_with_a_note(world):
    (world / "bom.JSONL").write_bytes(b'\xef\xbb\xbf{"text": "w3 w4 w5"}\n{"text": "w6 w7", "target": "w8"}\n')
    done = run(merge("--max-length", "1000", "--out", "bom_out", calibration=("bom.JSONL", "cal1.txt")), world)
    assert done.returncode == 0, done.stderr
    assert "--max-length 1000 is beyond the 64 positions" in done.stderr
    report = json.loads((world / "bom_out" / "iteris_report.json").read_text())
    assert [c["samples"] for c in report["calibration"]] == [2, 4]
    assert report["recipe"]["max_length"] == 64


def test_an_unreachable_hub_fails_fast_without_offline_mode(monkeypatch):
    """Without HF_HUB_OFFLINE, a hub that never answers costs at most the probe's timeout, not 30 s of retries."""
    import socket

    from iteris_lab.errors import IterisError
    from iteris_lab.io import base_model

    def hang(*args, **kwargs):
        time.sleep(30)

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "create_connection", hang)
    start = time.perf_counter()
    with pytest.raises(IterisError, match="the hub is not reachable"):
        base_model.resolve_base("nobody/no-such-model", [])
    assert time.perf_counter() - start < 10


# -- the calibration reader, in process -------------------------------------------------------------------------

def test_suffixes_are_case_insensitive_and_json_arrays_are_read(tmp_path):
    (tmp_path / "a.JSONL").write_text('{"text": "x", "target": "y"}\n')
    (tmp_path / "b.json").write_text('["x", {"prompt": "z"}]')
    (tmp_path / "c.TXT").write_bytes(b"\xef\xbb\xbfx\n\n  \nz\n")
    assert read_inputs(tmp_path / "a.JSONL") == [{"text": "x", "target": "y"}]
    assert read_inputs(tmp_path / "b.json") == [{"text": "x", "target": None}, {"text": "z", "target": None}]
    assert [r["text"] for r in read_inputs(tmp_path / "c.TXT")] == ["x", "z"]  # BOM gone, blank lines skipped


def test_another_encoding_reads_what_utf8_refuses(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes("café\n".encode("latin-1"))
    with pytest.raises(CalibrationError, match=r"latin.txt:1: not valid utf-8"):
        read_inputs(path)
    assert read_inputs(path, encoding="latin-1") == [{"text": "café", "target": None}]


def test_tokenize_leaves_the_tokenizer_as_it_was_and_checks_texts(tmp_path):
    from transformers import AutoTokenizer

    save_tokenizer(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    tokenizer.pad_token = None
    batches = tokenize(tokenizer, ["w3 w4 w5", {"text": "w6", "target": "w7"}], batch_size=2)
    assert tokenizer.pad_token is None  # the caller's tokenizer is not modified
    assert batches[0]["attention_mask"].sum(1).tolist() == [3, 2]  # target teacher-forced after the text
    with pytest.raises(CalibrationError, match="calibration text 1"):
        tokenize(tokenizer, ["w3", {"text": 3}])
    with pytest.raises(CalibrationError, match="no chat template"):
        tokenize(tokenizer, ["w3"], chat_template=True)


def test_chat_template_wraps_each_text_as_a_user_turn_with_the_generation_prompt(tmp_path):
    from transformers import AutoTokenizer

    save_tokenizer(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    # a toy template: <s> before each turn, "w9" as the assistant's generation prompt
    tokenizer.chat_template = ("{% for m in messages %}<s> {{ m['content'] }} {% endfor %}"
                               "{% if add_generation_prompt %}w9 {% endif %}")
    plain = tokenize(tokenizer, ["w3 w4"])[0]["input_ids"][0].tolist()
    chat = tokenize(tokenizer, [{"text": "w3 w4", "target": "w5"}], chat_template=True)[0]["input_ids"][0].tolist()
    vocab = tokenizer.get_vocab()
    assert chat == [vocab["<s>"], vocab["w3"], vocab["w4"], vocab["w9"], vocab["w5"]]
    assert plain == [vocab["w3"], vocab["w4"]]
