"""`iteris-lab compare` and iteris_lab.tracks.own.compare on a tiny llama: fidelity of every model to each task's
own LoRA, checked against PEFT run prompt by prompt (no padding, no batching)."""
import copy
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import iteris_lab
from iteris_lab import IterisError
from iteris_lab.tracks.own import compare
from tiny import WORDS, make_lora, saved_model

COMMAND = [str(Path(sys.executable).with_name("iteris-lab"))]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A saved tiny llama with a tokenizer, two task LoRAs, a prompt file each (task_0 with targets), a merge."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("compare")
    base, model = saved_model("llama", root / "base")
    adapters = [make_lora(model, root / f"task_{i}", ["q_proj", "v_proj", "up_proj"], seed=i + 1,
                          task_type="CAUSAL_LM") for i in range(2)]
    rng = random.Random(0)
    prompts = [[" ".join(rng.choices(WORDS, k=rng.randint(2, 8))) for _ in range(6)] for _ in range(2)]
    files = [root / "task_0.jsonl", root / "task_1.txt"]
    files[0].write_text("\n".join(json.dumps({"text": p, "target": "w5"}) for p in prompts[0]) + "\n")
    files[1].write_text("\n".join(prompts[1]) + "\n")
    tokenizer = AutoTokenizer.from_pretrained(base)
    merged = iteris_lab.merge_loras(model, adapters, prompts, tokenizer=tokenizer, method="regmean", progress=False)
    merged.save_adapter(root / "regmean")
    shutil.copytree(adapters[0], root / "copy_of_0")  # a "merge" that is task_0's LoRA itself
    return dict(root=root, base=base, model=model, tokenizer=tokenizer, adapters=adapters, prompts=prompts,
                files=[str(f) for f in files], merged=[str(root / "regmean"), str(root / "copy_of_0")])


def run(*argv, cwd=None):
    env = dict(os.environ, TQDM_DISABLE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run(COMMAND + list(argv), capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def compare_argv(setup, *extra):
    argv = ["compare", "--base", setup["base"], "--max-new-tokens", "4", "--batch-size", "4"]
    for adapter, prompts in zip(setup["adapters"], setup["files"]):
        argv += ["--adapter", adapter, "--prompts", prompts]
    for merged in setup["merged"]:
        argv += ["--merged", merged]
    return argv + list(extra)


def peft_reference(setup, adapter, prompts, max_new_tokens=4):
    """Per prompt, alone: (answer, next-token log-probs (vocab,)) of the base with `adapter` (None: the base)."""
    from peft import PeftModel

    model = copy.deepcopy(setup["model"])
    model = PeftModel.from_pretrained(model, adapter).eval() if adapter else model
    tok = setup["tokenizer"]
    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids = tok(prompt, return_tensors="pt")["input_ids"]
            logprobs = model(input_ids=ids).logits[0, -1].log_softmax(-1)
            new = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tok.pad_token_id)[0, ids.shape[1]:]
            out.append((tok.decode(new, skip_special_tokens=True).strip().split("\n")[0].strip(), logprobs))
    return out


def test_compare_command_scores_every_model_on_every_task_as_peft_does(setup, tmp_path):
    done = run(*compare_argv(setup, "--json", str(tmp_path / "out.json")))
    assert done.returncode == 0, done.stderr
    assert "| model | task | agreement | KL | accuracy |" in done.stdout
    out = json.loads((tmp_path / "out.json").read_text())
    rows = {(r["model"], r["task"]): r for r in out["rows"]}
    models, tasks = ["base", "task_0", "task_1", "regmean", "copy_of_0"], ["task_0", "task_1"]
    assert list(rows) == [(m, t) for m in models for t in tasks]
    assert set(out["rows"][0]) == {"model", "task", "agreement", "kl", "accuracy"}
    # own LoRA and an identical copy: perfect fidelity; accuracy only where targets exist
    for model in ("task_0", "copy_of_0"):
        assert rows[(model, "task_0")]["agreement"] == 1.0
        assert rows[(model, "task_0")]["kl"] == pytest.approx(0, abs=1e-9)
    assert rows[("base", "task_1")]["accuracy"] is None and rows[("base", "task_0")]["accuracy"] is not None
    # the base model against task_0's LoRA, recomputed prompt by prompt with PEFT
    own = peft_reference(setup, setup["adapters"][0], setup["prompts"][0])
    base = peft_reference(setup, None, setup["prompts"][0])
    kl = [float((o.exp() * (o - b)).sum()) for (_, o), (_, b) in zip(own, base)]
    agree = [float(a == b) for (a, _), (b, _) in zip(own, base)]
    correct = [float(a == "w5") for a, _ in base]
    outcomes = {(o["model"], o["task"]): o for o in out["outcomes"]}[("base", "task_0")]
    assert outcomes["kl"] == pytest.approx(kl, rel=1e-4, abs=1e-7) and outcomes["agreement"] == agree
    assert outcomes["correct"] == correct
    assert rows[("base", "task_0")]["kl"] == pytest.approx(sum(kl) / len(kl), rel=1e-4)
    assert max(kl) > 1e-4  # the LoRA changes the model: KL 0 above is a finding, not a blind measure


BAD = {
    "prompts count": (lambda a, s: a + ["--prompts", s["files"][0]], "3 --prompts files for 2 --adapter folders"),
    "missing prompts": (lambda a, s: [x if x != s["files"][1] else x + ".nope" for x in a], "is not a file"),
    "name clash": (lambda a, s: a + ["--merged", s["adapters"][0]], "two models would be named 'task_0'"),
    "json folder": (lambda a, s: a + ["--json", str(s["root"])], "is a folder; give a file name"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_compare_input_is_one_line_and_exit_2(setup, case, capsys):
    from iteris_lab.cli import main

    change, message = BAD[case]
    assert main(change(compare_argv(setup), setup)) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_the_real_command_refuses_bad_input_without_a_traceback(setup):
    change, message = BAD["prompts count"]
    done = run(*change(compare_argv(setup), setup))
    assert done.returncode == 2 and "Traceback" not in done.stderr and message in done.stderr


def test_compare_in_python_keeps_answers_outcomes_and_paired_differences(setup):
    merge = iteris_lab.merge_loras(setup["model"], setup["adapters"], setup["prompts"], tokenizer=setup["tokenizer"],
                                   method="linear", progress=False)
    before = {k: v.clone() for k, v in setup["model"].state_dict().items()}
    result = compare(setup["model"], setup["tokenizer"], setup["adapters"], setup["files"],
                     {"linear": merge, "copy": setup["merged"][1]}, max_new_tokens=4, batch_size=4, progress=False)
    assert all(torch.equal(before[k], v) for k, v in setup["model"].state_dict().items())  # W0 restored
    own = peft_reference(setup, setup["adapters"][1], setup["prompts"][1])
    assert result.answers[("task_1", "task_1")] == [a for a, _ in own]
    same = result.paired("copy", "task_0", "task_0")
    assert (same.mean, same.low, same.high, same.verdict) == (0.0, 0.0, 0.0, "within noise")
    diff = result.paired("base", "copy", "task_0", "kl")
    assert diff.mean == pytest.approx(result.frame().set_index(["model", "task"]).loc[("base", "task_0"), "kl"])
    with pytest.raises(IterisError, match="no prompt with a target"):
        result.paired("base", "copy", "task_1", "correct")
    with pytest.raises(IterisError, match="no outcomes for model 'nope'"):
        result.paired("nope", "copy", "task_0")


def test_compare_refuses_bad_inputs_before_evaluating(setup):
    args = (setup["model"], setup["tokenizer"], setup["adapters"])
    with pytest.raises(IterisError, match="1 prompt sets for 2 adapters"):
        compare(*args, [setup["files"][0]], progress=False)
    with pytest.raises(IterisError, match="named 'base' like the base"):
        compare(*args, setup["files"], {"base": setup["merged"][0]}, progress=False)
    with pytest.raises(IterisError, match="prompt 1: expected a text"):
        compare(*args, [[{"text": "w3", "target": 5}], ["w4"]], progress=False)


def test_plots_of_a_comparison(setup):
    from iteris_lab.viz.compare import paired_table, plot_fidelity, plot_paired

    result = compare(setup["model"], setup["tokenizer"], setup["adapters"], setup["files"], setup["merged"][:1],
                     limit=3, max_new_tokens=2, progress=False)
    figure = plot_fidelity(result)
    assert [ax.get_ylabel() for ax in figure.axes] == ["agreement with own LoRA", "KL(own LoRA ‖ model), nats"]
    table = paired_table(result, "base", resamples=200)
    assert len(table) == 3 * 2 and set(table["verdict"]) <= {"ahead", "behind", "within noise"}
    assert len(plot_paired(result, "base", resamples=200).axes[0].get_yticklabels()) == 6


def test_compare_has_help(capsys):
    from iteris_lab.cli import build_parser

    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["compare", "--help"])
    assert exit_info.value.code == 0 and "--merged" in capsys.readouterr().out
