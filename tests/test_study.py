"""Chapter 06's extra SmolLM2 tasks, the study helpers and its figures (on a made-up study, no model)."""
import pytest
import torch

from iteris_lab.tracks.llm import study
from iteris_lab.tracks.llm.tasks import load_tasks, smollm2_more_tasks

EXTRA = ("subtraction", "larger", "parity")


def test_the_default_smollm2_track_keeps_its_three_tasks_and_the_extra_ones_load_by_name():
    assert list(load_tasks("smollm2")) == ["sentiment", "topic", "addition"]
    assert list(load_tasks("smollm2", ["parity", "addition"])) == ["parity", "addition"]
    with pytest.raises(ValueError, match="unknown smollm2 task"):
        load_tasks("smollm2", ["division"])


@pytest.mark.parametrize("name", EXTRA)
def test_extra_task_splits_do_not_share_an_input(name):
    task = smollm2_more_tasks()[name]
    texts = [{ex.text for ex in task.split(s)} for s in ("train", "val", "test")]
    assert all(len(t) == len(task.split(s)) for t, s in zip(texts, ("train", "val", "test")))
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])


def test_extra_task_answers_are_right():
    tasks = smollm2_more_tasks()
    for ex in tasks["subtraction"].train[:200]:
        a, b = map(int, ex.text.split(" - "))
        assert int(ex.answer) == a - b >= 0
    for ex in tasks["larger"].train[:200]:
        numbers = [int(x) for x in ex.text.split(", ")]
        assert len(set(numbers)) == 3 and int(ex.answer) == max(numbers)
    parity = tasks["parity"]
    for ex in parity.train:
        assert parity.labels[ex.label] == ex.answer == ("even", "odd")[int(ex.text) % 2]
    share_even = sum(ex.label == 0 for ex in parity.test) / len(parity.test)
    assert 0.35 < share_even < 0.65


def test_extra_tasks_are_seeded():
    a, b, c = smollm2_more_tasks(0), smollm2_more_tasks(0), smollm2_more_tasks(1)
    assert a["larger"].test == b["larger"].test
    assert a["larger"].test != c["larger"].test


def test_nested_subsets_add_one_task_at_a_time():
    subsets = study.nested_subsets("abcd")
    assert subsets == [["a", "b"], ["a", "b", "c"], ["a", "b", "c", "d"]]


def test_relative_distance_is_the_frobenius_ratio_over_all_layers():
    ref = {"x": torch.ones(2, 2), "y": torch.zeros(3)}
    moved = {"x": torch.ones(2, 2), "y": torch.tensor([0.0, 2.0, 0.0])}
    assert study.relative_distance(ref, ref) == 0.0
    assert study.relative_distance(moved, ref) == pytest.approx(1.0)  # ‖(0, 2)‖ / ‖four ones‖ = 2 / 2


def _fake_tasks_study():
    order = ["a", "b", "c"]
    rows = []
    for k in (2, 3):
        for label, score in (("linear", 0.9 - 0.1 * k), ("iteris_sweep", 0.95)):
            acc = {t: score for t in order[:k]}
            rows.append({"label": label, "k": k, "accuracy": acc, "normalized": acc, "mean_accuracy": score,
                         "mean_normalized": score})
    return {"model": "toy", "order": order, "own": dict.fromkeys(order, 1.0), "base": dict.fromkeys(order, 0.2),
            "rows": rows}


def test_task_count_figure_draws_one_line_per_method_and_each_control_changes_it():
    from iteris_lab.viz.study import plot_task_count, task_count_widget

    data = _fake_tasks_study()
    fig = plot_task_count(data)
    ax = fig.axes[0]
    assert {line.get_label() for line in ax.get_lines()} >= {"linear (average)", "IterIS (sweep)"}
    assert ax.get_legend() is not None and ax.get_xlabel() and ax.get_ylabel()
    other = _fake_tasks_study()
    other["order"] = ["c", "b", "a"]
    for row in other["rows"]:
        row["mean_normalized"] = row["mean_normalized"] / 2
    widget = task_count_widget({"first": data, "second": other})
    order, task, normalized = widget.children[0].children

    def lines():
        return [tuple(line.get_ydata()) for line in widget.figure.axes[0].get_lines()]

    seen = [lines()]
    for control, value in ((order, "second"), (task, "c"), (normalized, False)):
        control.value = value
        seen.append(lines())
    assert all(a != b for a, b in zip(seen, seen[1:]))


def _fake_samples_study():
    rows = []
    for seed in (0, 1):
        for samples in (5, 50, 500):
            for label, score in (("regmean", 0.9 + 0.01 * seed), ("iteris_sweep", 0.8 + samples / 5000)):
                acc = {"a": score, "b": score - 0.1}
                rows.append({"label": label, "samples": samples, "seed": seed, "accuracy": acc, "normalized": acc,
                             "mean_accuracy": score - 0.05, "mean_normalized": score - 0.05})
    return {"model": "toy", "tasks": ["a", "b"], "samples": rows}


def test_samples_widget_slider_reads_off_each_method_at_the_chosen_sample_count():
    from iteris_lab.viz.study import samples_widget

    widget = samples_widget(_fake_samples_study())
    task, seeds, mark = widget.children[0].children
    assert list(mark.options) == [5, 50, 500]
    titles = [widget.figure.axes[0].get_title()]
    for control, value in ((mark, 500), (task, "b"), (seeds, False)):
        control.value = value
        titles.append(widget.figure.axes[0].get_title())
    # at 500 samples the IterIS line of the fake study is 0.8 + 0.1 - 0.05 (mean over tasks), then 0.9 - 0.1 on b
    assert "IterIS (sweep) 0.850" in titles[1] and "IterIS (sweep) 0.800" in titles[2]
    assert titles[0] != titles[1] != titles[2]
    assert len(widget.figure.axes[0].collections) == 0  # the seeded dots are gone


def test_samples_figure_draws_the_data_free_references_and_one_error_bar_per_interval():
    from iteris_lab.measure import PairedDifference
    from iteris_lab.viz.study import plot_samples

    bars = {"regmean": {50: PairedDifference(0.9, 0.85, 0.95, 100, 0.95)},
            "iteris_sweep": {5: PairedDifference(0.8, 0.7, 0.9, 100, 0.95),
                             500: PairedDifference(0.85, 0.8, 0.9, 100, 0.95)}}
    fig = plot_samples(_fake_samples_study(), references={"ties": 0.97, "linear": 0.93}, intervals=bars)
    ax = fig.axes[0]
    labels = {line.get_label() for line in ax.get_lines()}
    assert {"TIES (data-free)", "linear (average) (data-free)"} <= labels
    flat = [tuple(line.get_ydata()) for line in ax.get_lines() if line.get_label().endswith("(data-free)")]
    assert sorted(flat) == [(0.93, 0.93), (0.97, 0.97)]
    segments = [seg for coll in ax.collections if hasattr(coll, "get_segments") for seg in coll.get_segments()]
    spans = sorted((round(float(s[0][1]), 3), round(float(s[1][1]), 3)) for s in segments)
    assert spans == [(0.7, 0.9), (0.8, 0.9), (0.85, 0.95)]  # one vertical bar per interval, low to high


def _row(correct_a, correct_b):
    acc = {t: sum(v) / len(v) for t, v in (("a", correct_a), ("b", correct_b))}
    return {"label": "x", "accuracy": acc, "per_example": {"a": {"correct": correct_a}, "b": {"correct": correct_b}}}


def test_normalized_difference_is_the_difference_of_mean_normalized_accuracies_paired_by_example():
    own = {"a": 0.5, "b": 0.8}
    one, two = _row([1, 1, 0, 1], [1, 0, 1, 1, 1]), _row([1, 0, 0, 1], [1, 0, 1, 0, 1])
    d = study.normalized_difference(one, two, own, resamples=2000)
    expected = ((0.75 - 0.5) / 0.5 + (0.8 - 0.6) / 0.8) / 2
    assert d.mean == pytest.approx(expected) and d.low <= d.mean <= d.high
    alone = study.normalized_interval(one, own, resamples=2000)
    assert alone.mean == pytest.approx((0.75 / 0.5 + 0.8 / 0.8) / 2)


def test_smallest_p_is_the_one_sided_mcnemar_p_of_the_net_count():
    a = {"accuracy": {"s": 20 / 30, "t": 10 / 30}}
    b = {"accuracy": {"s": 18 / 30, "t": 9 / 30}}
    assert study.smallest_p(a, b, 30) == (3, pytest.approx(0.25))   # 3 discordant, all one way: 2 · 2^-3
    assert study.smallest_p(b, a, {"s": 30, "t": 30})[0] == -3
    big = {"accuracy": {"s": 26 / 30, "t": 10 / 30}}
    assert study.smallest_p(big, b, 30)[1] < 0.05                   # 9 net examples could be significant
