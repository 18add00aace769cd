"""The committed chapters are readable without running them (issue 19): every code cell's outputs were made from
its current source (scripts/refresh_outputs.py stores a hash of it), every exercise solution is hidden, and no
output carries a machine's absolute paths. Nothing is executed: this reads JSON and runs in well under a second."""
import copy
import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "notebooks").glob("*.ipynb"))
FIX = "run `python scripts/refresh_outputs.py {}` and commit the notebook"


def _load_script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


refresher = _load_script("refresh_outputs")
builder = _load_script("build_book")


def read(path):
    return json.loads(path.read_text(encoding="utf-8"))


def output_texts(nb):
    for cell in nb["cells"]:
        for output in cell.get("outputs", []):
            if "text" in output:
                yield "".join(output["text"])
            for mime, value in output.get("data", {}).items():
                if mime.startswith("text/"):
                    yield "".join(value)


def test_the_chapters_exist():
    assert len(CHAPTERS) >= 7


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_every_code_cell_has_outputs_made_from_its_current_source(path):
    problems = refresher.stale_cells(read(path))
    assert not problems, f"{path.name}: " + "; ".join(problems) + f" — {FIX.format(path.relative_to(ROOT))}"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_every_solution_is_hidden(path):
    problems = refresher.unhidden_solutions(read(path))
    assert not problems, f"{path.name}: " + "; ".join(problems) + f" — {FIX.format(path.relative_to(ROOT))}"


# An absolute path of the machine that ran the chapter: the refresh rewrites them to short names (<site-packages>/,
# <tmp>, ../, ~/).
MACHINE_PATH = re.compile(r"(?<![\w.~>-])/(?:home|root|tmp|work|Users|usr|opt|var|private)/")


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_outputs_carry_no_absolute_paths_or_progress_bars(path):
    nb = read(path)
    for text in output_texts(nb):
        assert not MACHINE_PATH.search(text), f"{path.name}: absolute path in an output: {text[:200]!r}"
        assert "it/s]" not in text and "s/it]" not in text, f"{path.name}: a progress bar in an output"


# The check itself, on a small notebook: each of these fails if stale_cells or hide_solutions misses the case.

def small_notebook():
    nb = {"cells": [
        {"cell_type": "markdown", "metadata": {}, "source": "# a chapter"},
        {"cell_type": "code", "metadata": {}, "source": ["x = 1\n", "print(x)"], "execution_count": 1,
         "outputs": [{"output_type": "stream", "name": "stdout", "text": "1\n"}]},
        {"cell_type": "code", "metadata": {"tags": ["solution"]}, "source": "print(2)", "execution_count": 2,
         "outputs": []},
    ], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    refresher.record_hashes(nb)
    refresher.hide_solutions(nb)
    return nb


def test_a_refreshed_notebook_is_clean():
    nb = small_notebook()
    assert refresher.stale_cells(nb) == [] and refresher.unhidden_solutions(nb) == []
    meta = nb["cells"][2]["metadata"]
    assert meta["jupyter"] == {"source_hidden": True, "outputs_hidden": True} and "hide-cell" in meta["tags"]


def test_an_edited_code_cell_is_stale():
    nb = small_notebook()
    nb["cells"][1]["source"] = "x = 2\nprint(x)"
    (problem,) = refresher.stale_cells(nb)
    assert problem.startswith("cell 1") and "source changed" in problem


def test_a_code_cell_added_after_the_refresh_is_stale():
    nb = small_notebook()
    nb["cells"].append({"cell_type": "code", "metadata": {}, "source": "y = 3", "outputs": []})
    (problem,) = refresher.stale_cells(nb)
    assert problem.startswith("cell 3") and "no source hash" in problem


def test_a_notebook_never_refreshed_is_reported():
    nb = small_notebook()
    for cell in nb["cells"]:
        cell["metadata"].pop("iteris", None)
        cell["outputs"] = [] if cell["cell_type"] == "code" else cell.get("outputs")
    assert refresher.stale_cells(nb) == ["no outputs: the notebook was never refreshed"]


def test_an_edited_markdown_cell_keeps_the_outputs_valid():
    nb = small_notebook()
    nb["cells"][0]["source"] = "# the chapter, reworded"
    assert refresher.stale_cells(nb) == []


def test_a_visible_solution_is_reported():
    nb = small_notebook()
    nb["cells"][2]["metadata"]["jupyter"]["outputs_hidden"] = False
    nb["cells"][2]["metadata"]["tags"].remove("hide-cell")
    problems = refresher.unhidden_solutions(nb)
    assert len(problems) == 2 and all(p.startswith("cell 2") for p in problems)


def test_the_hash_ignores_how_nbformat_splits_lines():
    as_lines = {"source": ["a\n", "b"]}
    assert refresher.source_sha256(as_lines) == refresher.source_sha256({"source": "a\nb"})
    assert refresher.source_sha256(as_lines) != refresher.source_sha256({"source": "a\nb "})


def test_scrubbing_removes_machine_paths_addresses_and_widget_views():
    nb = small_notebook()
    site_packages = refresher.sysconfig.get_paths()["purelib"]
    nb["cells"][1]["outputs"] = [
        {"output_type": "stream", "name": "stderr",
         "text": f"{site_packages}/peft/x.py:3: Warning\nsaved to {refresher.ROOT}/runs/a\n"},
        {"output_type": "execute_result", "execution_count": 1, "metadata": {},
         "data": {"text/plain": "<Foo object at 0x7f3a2b1c>"}},
        {"output_type": "display_data", "metadata": {},
         "data": {"application/vnd.jupyter.widget-view+json": {"model_id": "abc"}, "text/plain": "interactive(...)"}},
    ]
    scrubbed = copy.deepcopy(nb)
    refresher.scrub_outputs(scrubbed)
    stream, result, widget = scrubbed["cells"][1]["outputs"]
    assert stream["text"] == "<site-packages>/peft/x.py:3: Warning\nsaved to ../runs/a\n"
    assert result["data"]["text/plain"] == "<Foo object>"
    assert widget["data"] == {"text/plain": refresher.WIDGET_NOTE}


# The site builder's destination rule: it replaces only a folder it built itself (nothing of the user's is lost).

def test_the_builder_accepts_a_new_or_empty_folder(tmp_path):
    builder.check_out(tmp_path / "site", overwrite=False)
    (tmp_path / "empty").mkdir()
    builder.check_out(tmp_path / "empty", overwrite=False)


def test_the_builder_refuses_a_folder_it_did_not_build_even_with_overwrite(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(builder.BuildError, match="not a site built by this script"):
        builder.check_out(tmp_path, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_the_builder_replaces_its_own_build_only_with_overwrite(tmp_path):
    (tmp_path / builder.MARKER).write_text("")
    (tmp_path / "index.html").write_text("<html></html>")
    with pytest.raises(builder.BuildError, match="--overwrite"):
        builder.check_out(tmp_path, overwrite=False)
    builder.check_out(tmp_path, overwrite=True)


def test_the_front_page_table_lists_every_chapter_with_its_run():
    table = builder.provenance_table(CHAPTERS).splitlines()
    assert len(table) == 2 + len(CHAPTERS)
    for line, path in zip(table[2:], CHAPTERS):
        profile = read(path)["metadata"].get("iteris", {}).get("profile", "not refreshed")
        assert f"]({path.name})" in line and f"| {profile} |" in line
