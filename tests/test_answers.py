"""viz.answers.hidden_answer: what a solution cell prints is displayed folded, never as plain output."""
import pytest

pytest.importorskip("IPython")


def test_a_solution_prints_nothing_and_displays_its_answer_inside_a_closed_details_element(monkeypatch, capsys):
    import IPython.display

    from iteris_lab.viz.answers import hidden_answer

    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda bundle, raw=False: shown.append(bundle))
    with hidden_answer():
        print("the answer is <42>")
    assert capsys.readouterr().out == ""  # nothing reaches the cell's plain output
    (bundle,) = shown
    assert bundle["text/html"].startswith("<details><summary>Show the answer</summary>")
    assert "the answer is &lt;42&gt;" in bundle["text/html"] and "<details open" not in bundle["text/html"]
    assert "42" not in bundle["text/plain"]
    with hidden_answer():
        pass  # a solution that only asserts displays nothing
    assert len(shown) == 1
