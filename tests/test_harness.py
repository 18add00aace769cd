"""The benchmark harness on a tiny BERT track: every row, normalized scores, the JSON schema, weights restored."""
import json

import pytest
import torch

from iteris_lab.profiles import PROFILES
from iteris_lab.tracks import harness
from iteris_lab.tracks.llm import track as llm_track
from iteris_lab.tracks.llm.tasks import Example, Task
from tiny import WORDS, build_tiny, make_lora, save_tokenizer


def tiny_task(name, seed):
    g = torch.Generator().manual_seed(seed)

    def examples(n):
        out = []
        for _ in range(n):
            ids = torch.randint(0, len(WORDS), (5,), generator=g).tolist()
            label = sum(ids) % 3
            out.append(Example(" ".join(WORDS[i] for i in ids), answer=str(label), label=label))
        return tuple(out)

    return Task(name, "sequence_classification", ("a", "b", "c"), examples(24), examples(8), examples(12))


@pytest.fixture
def track(tmp_path):
    from transformers import AutoTokenizer

    save_tokenizer(tmp_path / "tok")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tok")
    model = build_tiny("bert")
    tasks = {f"t{i}": tiny_task(f"t{i}", i) for i in range(3)}
    adapters = {t: make_lora(model, tmp_path / t, ["query", "value"], seed=i + 1) for i, t in enumerate(tasks)}
    g = torch.Generator().manual_seed(7)
    heads = {t: {"classifier.weight": torch.randn(3, 32, generator=g), "classifier.bias": torch.zeros(3)} for t in tasks}
    return llm_track.LlmTrack("tiny", model, tokenizer, tasks, adapters, heads, max_length=16)


def test_run_methods_rows_and_json_schema(track, tmp_path):
    before = {k: v.clone() for k, v in track.model.state_dict().items() if "classifier" not in k}
    profile = PROFILES["ci"]
    rows = harness.run_methods(track, profile, progress=False)
    labels = [r["label"] for r in rows]
    assert labels == ["base", "lora:t0", "lora:t1", "lora:t2", *harness.DEMO_METHODS]
    after = track.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # every merge was taken out again
    for i, task in enumerate(track.tasks):
        assert rows[1 + i]["normalized"][task] == pytest.approx(1.0)
    by_label = {r["label"]: r for r in rows}
    assert by_label["regmean"]["calibration_samples"] == profile.calibration_samples
    assert by_label["regmean_many"]["calibration_samples"] == profile.many_samples
    assert by_label["iteris"]["settings"]["max_iter"] == profile.max_iter
    for r in rows[4:]:
        assert r["merge_seconds"] > 0 and r["peak_memory_mb"] >= 0
        assert 0 <= r["mean_accuracy"] <= 1 and r["mean_normalized"] >= 0
    out = llm_track.report(track, profile, rows, seconds=1.0)
    text = json.dumps(out)  # JSON-ready
    again = json.loads(text)
    assert set(again) >= {"model", "profile", "environment", "tasks", "results", "seconds"}
    assert again["tasks"]["t0"]["test_size"] == 12
    table = harness.markdown_table(rows)
    assert table.count("\n") == len(rows) + 1 and "| iteris |" in table


def test_validation_choice_never_reads_test(track, monkeypatch):
    seen = []
    original = llm_track.LlmTrack.evaluate

    def spy(self, split, *args, **kwargs):
        seen.append(split)
        return original(self, split, *args, **kwargs)

    monkeypatch.setattr(llm_track.LlmTrack, "evaluate", spy)
    grid = {"alpha": (1e-4,), "adaptive_weights": ("official", "none")}
    chosen, tried = harness.choose_iteris(track, PROFILES["ci"], grid=grid, progress=False)
    assert set(seen) == {"val"} and len(tried) == 2
    assert chosen["adaptive_weights"] in ("official", "none")


def test_missing_adapters_say_how_to_train_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_loras.py --model minilm"):
        llm_track.load_track("minilm", adapter_root=tmp_path)


def test_given_references_only_the_merges_run_and_rows_say_how_they_were_calibrated(track):
    class Tagged(llm_track.LlmTrack):
        calibration_info = {"mask": "text"}  # e.g. the VLM's calibration mask

    tagged = Tagged(**{f: getattr(track, f) for f in ("name", "model", "tokenizer", "tasks", "adapters", "heads",
                                                      "max_length")})
    profile = PROFILES["ci"]
    refs = harness.references(tagged, profile.test_limit)
    assert set(refs.loras) == set(track.tasks) and set(refs.base) == set(track.tasks)
    rows = harness.run_methods(tagged, profile, labels=("linear", "regmean"), progress=False, refs=refs)
    assert [r["label"] for r in rows] == ["linear", "regmean"]
    assert rows[0]["mask"] is None and rows[1]["mask"] == "text"  # data-free methods read no calibration
    assert rows[1]["objective"] and rows[0]["eval_seconds"] > 0
    again = harness.run_methods(tagged, profile, labels=("linear",), progress=False, own=refs.own())
    assert again[0]["normalized"] == rows[0]["normalized"]
    table = harness.markdown_table(rows)
    assert "| linear |" in table and table.splitlines()[2].split("|")[-4].strip() == "0"  # samples/task of linear


def test_every_row_keeps_its_per_example_outcomes_and_rows_compare_paired(track):
    profile = PROFILES["ci"]
    rows = harness.run_methods(track, profile, labels=("linear", "ties"), progress=False)
    by = {r["label"]: r for r in rows}
    assert set(by) == {"base", "lora:t0", "lora:t1", "lora:t2", "linear", "ties"}
    for row in rows:  # reference rows too, in test-set order, and their mean is the row's accuracy
        for task, acc in row["accuracy"].items():
            correct = row["per_example"][task]["correct"]
            assert len(correct) == len(track.tasks[task].test) and set(correct) <= {0, 1}
            assert sum(correct) / len(correct) == pytest.approx(acc)
    diff = harness.paired(by["linear"], by["base"], "t0", "correct", resamples=2000)
    assert diff.mean == pytest.approx(by["linear"]["accuracy"]["t0"] - by["base"]["accuracy"]["t0"])
    assert diff.low <= diff.mean <= diff.high and diff.p_value is not None
    own = {t: by[f"lora:{t}"]["accuracy"][t] for t in track.tasks}
    mean = harness.paired_mean(by["linear"], by["ties"], "correct", scale={t: 1 / own[t] for t in own})
    assert mean.mean == pytest.approx(by["linear"]["mean_normalized"] - by["ties"]["mean_normalized"])
    same = harness.paired_mean(by["ties"], by["ties"], "correct")
    assert (same.mean, same.low, same.high, same.verdict) == (0.0, 0.0, 0.0, "within noise")


def test_paired_mean_weighs_each_task_equally_whatever_its_size():
    a = {"label": "a", "per_example": {"big": {"s": [1.0] * 30}, "small": {"s": [0.0, 0.0]}}}
    b = {"label": "b", "per_example": {"big": {"s": [0.0] * 30}, "small": {"s": [0.0, 0.0]}}}
    assert harness.paired_mean(a, b, "s").mean == pytest.approx(0.5)  # (1 + 0) / 2, not 30 / 32
    assert harness.paired_mean(a, b, "s", scale={"big": 2.0}).mean == pytest.approx(1.0)


def test_outcomes_are_taken_from_either_place_the_contract_allows():
    flat = {"t": 0.5, "per_example": {"t": {"correct": [1, 0]}}}
    nested = {"t": {"style": 0.5, "per_example": {"style": [1, 0]}}}
    assert harness.split_outcomes(flat) == ({"t": 0.5}, {"t": {"correct": [1, 0]}})
    assert harness.split_outcomes(nested) == ({"t": {"style": 0.5}}, {"t": {"style": [1, 0]}})
    assert "per_example" in nested["t"]  # what the track returned is left as it was


def test_rows_without_outcomes_or_on_other_examples_say_what_to_do():
    old = {"label": "old", "accuracy": {"t": 0.5}}
    new = {"label": "new", "per_example": {"t": {"correct": [1, 0, 1]}}}
    with pytest.raises(harness.OutcomesError, match="re-run its benchmark"):
        harness.paired(new, old, "t", "correct")
    with pytest.raises(harness.OutcomesError, match="3 and 2 examples"):
        harness.paired(new, {"label": "x", "per_example": {"t": {"correct": [1, 0]}}}, "t", "correct")
    with pytest.raises(harness.OutcomesError, match="same test examples"):
        harness.paired_mean(new, {"label": "x", "per_example": {"t": {"correct": [1, 0]}}}, "correct")


def test_results_json_keeps_each_outcome_list_on_one_line_and_reads_back_equal():
    out = {"results": [{"label": "x [1,\n 2]", "per_example": {"t": {"correct": [1, 0, 1], "score": [0.5, -1e-05]}}}]}
    text = harness.to_json(out)
    assert json.loads(text) == out
    assert '"correct": [1, 0, 1]' in text and '"score": [0.5, -1e-05]' in text


def test_the_demo_prints_and_writes_each_rows_interval_and_its_paired_difference_from_iteris(
        track, tmp_path, monkeypatch, capsys):
    from functools import partial

    from iteris_lab.tracks import intervals

    monkeypatch.setenv("ITERIS_PROFILE", "ci")
    monkeypatch.setattr(llm_track, "load_track", lambda model: track)
    monkeypatch.setattr(llm_track, "run_methods", partial(harness.run_methods, labels=("linear", "iteris")))
    llm_track.run_demo(json_path=tmp_path / "results.json", quiet=True)
    printed = capsys.readouterr().out
    rows = json.loads((tmp_path / "results.json").read_text())["results"]
    by = {r["label"]: r for r in rows}
    scale = harness.own_scale(rows)
    for row in rows:  # the interval the table shows is harness.mean_interval's, around the row's mean
        want = harness.mean_interval(row, "correct", scale)
        stored = row["intervals"]["mean_normalized"]
        assert (stored["low"], stored["high"]) == (want.low, want.high)
        assert stored["mean"] == pytest.approx(row["mean_normalized"]) and want.low <= want.mean <= want.high
        line = next(li for li in printed.splitlines() if li.startswith(f"| {row['label']} |") and "[" in li)
        assert f"| {want.mean:.3f} [{want.low:.2f}, {want.high:.2f}] |" in line
    diff = harness.paired_mean(by["linear"], by["iteris"], "correct", scale)
    assert diff.mean == pytest.approx(by["linear"]["mean_normalized"] - by["iteris"]["mean_normalized"])
    assert by["linear"]["intervals"]["vs"]["verdict"] == diff.verdict
    assert f"{diff.mean:+.3f} [{diff.low:+.3f}, {diff.high:+.3f}] {diff.verdict}" in printed
    assert "| iteris | " in printed and "| reference |" in printed and "vs iteris [paired 95%]" in printed
    # an older JSON's rows (no per-example outcomes) still render, with a dash for each interval
    old = [{k: v for k, v in r.items() if k not in ("per_example", "intervals")} for r in rows]
    assert intervals.with_intervals(old) == old
    table = intervals.results_tables(old)
    assert table.count(f"| {intervals.MISSING} | {intervals.MISSING} |") == len(old)
    # the shipped tasks' longest labels and a slow, memory-heavy merge still fit a 100-column terminal
    tasks = dict(zip(track.tasks, ("airline_sentiment", "apple_sentiment", "topic")))
    wide = [{**r, "accuracy": {tasks[t]: v for t, v in r["accuracy"].items()}, "merge_seconds": 12345.6,
             "peak_memory_mb": 123456, "calibration_samples": 5000} for r in rows]
    assert wide[-1]["label"] == "iteris"
    for r in wide[:-1]:  # all but the reference row
        r["label"] = "lora:airline_sentiment" if r["method"] == "lora" else "task_arithmetic"
    lines = intervals.results_tables(wide).splitlines()
    assert max(len(li) for li in lines) <= 100, max(lines, key=len)


def test_environment_gives_the_keys_asked_in_their_order_and_no_commit_outside_git(tmp_path):
    from iteris_lab.tracks.environment import PROBES

    keys = ("date", "commit", "python", "load_average_at_start")
    env = harness.environment(keys, root=tmp_path)
    assert tuple(env) == keys and env["commit"] is None and len(env["load_average_at_start"]) == 3
    assert set(harness.environment()) < set(PROBES) and "torch_threads" in harness.environment()
