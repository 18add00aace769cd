"""The core reads as the paper in one sitting (issue 21): the method files stay short, the rest lives apart."""
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "iteris_lab"
# the method, in the reading order of docs/architecture.md, and what it is computed with
METHOD = ("settings", "adapters", "targets", "statistics", "objective", "merge", "sweep", "result", "features",
          "rows", "baselines", "errors")
# top-level modules that are not the method, named for what they are
APART = ("__init__", "__main__", "measure", "profiles", "paths")


def test_the_method_files_hold_at_most_1800_lines():
    lines = {name: len((PACKAGE / f"{name}.py").read_text().splitlines()) for name in METHOD}
    assert sum(lines.values()) <= 1800, lines


def test_every_top_level_module_is_the_method_or_says_what_else_it_is():
    top = {p.stem for p in PACKAGE.glob("*.py")}
    assert top == set(METHOD) | set(APART), top ^ (set(METHOD) | set(APART))
    architecture = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    assert all(f"{name}.py" in architecture for name in METHOD)
