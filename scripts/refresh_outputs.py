"""Execute the chapters and commit their outputs: the course can then be read without running it (issue 19).

    python scripts/refresh_outputs.py                          # every notebooks/*.ipynb, profile ci
    python scripts/refresh_outputs.py notebooks/03_llm_merge.ipynb --profile cpu

Why the `ci` profile by default: it is the profile CI executes under nbval on every submission, so the committed
outputs are the ones a reader can reproduce in minutes on a laptop CPU and that CI checks still run; the `cpu` and
`gpu` profiles give larger runs whose numbers live in docs/results.md. The profile used is recorded in the
notebook.

For each notebook, in a kernel started in notebooks/ (as nbval does) that imports this checkout's iteris_lab:
- every cell runs top to bottom; a cell that raises aborts the refresh and the file is left untouched (a
  half-executed chapter is never written);
- each code cell gets `metadata.iteris.source_sha256`, the hash of the source its outputs came from;
  tests/test_course.py fails when a cell's source no longer matches (edit a cell → refresh the chapter);
- the notebook gets `metadata.iteris`: profile, library version, git commit, Python and torch versions, date (UTC),
  the run time in seconds and the machine's 1-minute load average when it ended;
- exercise solutions (cells tagged `solution`) are hidden: `metadata.jupyter.source_hidden/outputs_hidden` (a
  chapter opened in JupyterLab shows them collapsed) and the myst-nb tag `hide-cell` with a "Show solution N" prompt
  (the site shows them behind a click). Measured with JupyterLab 4.6: after Run All the source stays collapsed, but
  running a cell expands its output, so whatever a solution cell prints becomes visible; an answer that must stay
  hidden after Run All must not be printed by the solution cell (e.g. it only asserts);
- volatile output is stripped: no progress bars (TQDM_DISABLE=1), no absolute paths (this checkout, the Python
  installation, the home and temporary folders are replaced by short names), no object addresses, no per-cell
  timestamps, no widget state (a widget needs a live kernel: its output becomes a one-line note; every widget in
  the chapters wraps a function that is also called once statically, so its figure is in the page anyway).
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import re
import site
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
SOLUTION_TAG = "solution"
HIDE_TAG = "hide-cell"  # myst-nb: input and output behind one toggle
SOLUTION_NUMBER = re.compile(r"#\s*Solution\s+(\d+)", re.IGNORECASE)  # the chapters' first line: "# Solution 2: ..."
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_NOTE = "[interactive widget: run the notebook in Jupyter to use it]"
INLINE_BACKEND = "module://matplotlib_inline.backend_inline"  # figures as image/png outputs, whatever MPLBACKEND says


class RefreshError(Exception):
    """A chapter could not be refreshed; the message names the notebook and the cell."""


def source_sha256(cell: dict) -> str:
    """sha256 (hex) of a cell's source, the same for nbformat's list-of-lines and string forms."""
    source = cell.get("source", "")
    if isinstance(source, list):
        source = "".join(source)
    return hashlib.sha256(source.encode("utf-8")).hexdigest()


def stale_cells(nb: dict) -> list[str]:
    """Why the committed outputs of `nb` (a notebook as parsed JSON) do not match its code, one line per code cell;
    empty when every code cell carries the hash of its current source. A notebook with no outputs at all and no
    refresh record is reported once (it has never been refreshed)."""
    code = [(i, c) for i, c in enumerate(nb["cells"]) if c["cell_type"] == "code"]
    refreshed = "iteris" in nb.get("metadata", {}) or any(c.get("outputs") for _, c in code)
    if not refreshed:
        return ["no outputs: the notebook was never refreshed"]
    problems = []
    for i, cell in code:
        stored = cell.get("metadata", {}).get("iteris", {}).get("source_sha256")
        first = "".join(cell.get("source", ""))[:60].splitlines()[0:1] or [""]
        if stored is None:
            problems.append(f"cell {i} ({first[0]!r}): no source hash, it was added after the last refresh")
        elif stored != source_sha256(cell):
            problems.append(f"cell {i} ({first[0]!r}): source changed since its outputs were made")
    return problems


def unhidden_solutions(nb: dict) -> list[str]:
    """Cells tagged `solution` that a reader would see without asking: not collapsed in Jupyter, or (code cells)
    not behind the site's toggle."""
    problems = []
    for i, cell in enumerate(nb["cells"]):
        meta = cell.get("metadata", {})
        if SOLUTION_TAG not in meta.get("tags", []):
            continue
        jupyter = meta.get("jupyter", {})
        if not jupyter.get("source_hidden"):
            problems.append(f"cell {i}: solution source not hidden (metadata.jupyter.source_hidden)")
        if cell["cell_type"] == "code":
            if not jupyter.get("outputs_hidden"):
                problems.append(f"cell {i}: solution output not hidden (metadata.jupyter.outputs_hidden)")
            if HIDE_TAG not in meta.get("tags", []):
                problems.append(f"cell {i}: solution shown on the site (tag {HIDE_TAG!r} missing)")
    return problems


def solution_prompts(cell: dict) -> dict:
    """myst-nb's toggle labels for a solution cell: "Show solution 2" when its first line names the exercise."""
    source = "".join(cell.get("source", ""))
    number = SOLUTION_NUMBER.match(source.lstrip())
    name = f"solution {number.group(1)}" if number else "solution"
    return {"code_prompt_show": f"Show {name}", "code_prompt_hide": f"Hide {name}"}


def hide_solutions(nb: dict) -> None:
    """Collapse every `solution` cell in Jupyter and put it behind a "Show solution" toggle on the site."""
    for cell in nb["cells"]:
        meta = cell.setdefault("metadata", {})
        if SOLUTION_TAG not in meta.get("tags", []):
            continue
        jupyter = meta.setdefault("jupyter", {})
        jupyter["source_hidden"] = True
        if cell["cell_type"] == "code":
            jupyter["outputs_hidden"] = True
            if HIDE_TAG not in meta["tags"]:
                meta["tags"].append(HIDE_TAG)
            meta.setdefault("mystnb", {}).update(solution_prompts(cell))


def _path_rules() -> list[tuple[re.Pattern, str]]:
    """(pattern, replacement) pairs turning machine-specific absolute paths into short stable names; longest
    prefixes first so site-packages wins over the interpreter prefix that contains it."""
    prefixes = {str(NOTEBOOKS) + os.sep: "", str(ROOT) + os.sep: "../", str(ROOT): ".."}
    for packages in {*site.getsitepackages(), sysconfig.get_paths()["purelib"]}:
        prefixes[packages + os.sep] = "<site-packages>/"
    prefixes[sys.prefix + os.sep] = "<python>/"
    prefixes[str(Path.home()) + os.sep] = "~/"
    rules = [(re.compile(re.escape(p)), r) for p, r in sorted(prefixes.items(), key=lambda kv: -len(kv[0]))]
    temp = re.escape(tempfile.gettempdir())
    rules.append((re.compile(temp + r"/[\w.-]+"), "<tmp>"))  # the random folder a cell made: its name changes
    rules.append((re.compile(r" at 0x[0-9a-fA-F]+"), ""))  # object reprs: <... object at 0x7f...>
    return rules


def _scrub_text(text, rules):
    joined = "".join(text) if isinstance(text, list) else text
    for pattern, replacement in rules:
        joined = pattern.sub(replacement, joined)
    return joined


def scrub_outputs(nb: dict) -> None:
    """Strip what changes from run to run or machine to machine out of every code cell's outputs."""
    rules = _path_rules()
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        cell.get("metadata", {}).pop("execution", None)  # nbclient's per-cell timestamps
        for output in cell.get("outputs", []):
            if "text" in output:
                output["text"] = _scrub_text(output["text"], rules)
            data = output.get("data", {})
            if WIDGET_VIEW in data:  # the model it points to is gone with the kernel
                output["data"] = {"text/plain": WIDGET_NOTE}
                continue
            for mime in ("text/plain", "text/html", "text/markdown", "text/latex"):
                if mime in data:
                    data[mime] = _scrub_text(data[mime], rules)
    nb.get("metadata", {}).pop("widgets", None)


def record_hashes(nb: dict) -> None:
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            cell.setdefault("metadata", {}).setdefault("iteris", {})["source_sha256"] = source_sha256(cell)


def _versions() -> dict:
    """Library, git, Python and torch versions, read from the kernel's point of view (this checkout first)."""
    probe = ("import json, sys, importlib.metadata as m, iteris_lab, torch;"
             "v = getattr(iteris_lab, '__version__', None) or m.version('iteris-lab');"
             "print(json.dumps({'iteris_lab': v, 'python': sys.version.split()[0], 'torch': torch.__version__}))")
    out = subprocess.run([sys.executable, "-c", probe], env=kernel_env("ci"), cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    versions = json.loads(out)
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    versions["git_commit"] = git.stdout.strip() if git.returncode == 0 else None
    return versions


def kernel_env(profile: str) -> dict:
    """The environment of the executing kernel: this checkout importable first, the chapter's profile, no progress
    bars, no hub, inline figures."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "ITERIS_PROFILE": profile, "TQDM_DISABLE": "1",
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "MPLBACKEND": INLINE_BACKEND,
            "PYDEVD_DISABLE_FILE_VALIDATION": "1"}


def wait_in_slices(channel, seconds: float = 2.0) -> None:
    """Make `channel.get_msg(timeout)` wait in slices of `seconds`, each ending in a fresh readiness check.

    Seen twice in chapter 02 (kernel and client both idle, the cell's reply never read, until the cell timeout):
    the client can miss the shell socket's wake-up when a cell opens widget comms (jupyter/nbclient#312). pyzmq's
    poll checks the socket again when its timeout fires, so a missed wake-up costs one slice instead of the cell
    timeout; a reply that has not come is waited for up to the same deadline as before."""
    from queue import Empty

    original = channel.get_msg

    async def get_msg(timeout=None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                return await original(timeout=seconds if left is None else min(seconds, left))
            except Empty:
                if deadline is not None and time.monotonic() >= deadline:
                    raise

    channel.get_msg = get_msg


def execute(path: Path, profile: str, timeout: int) -> tuple[dict, float]:
    """Run every cell of `path` in a fresh kernel (cwd notebooks/); return the executed notebook and its seconds.
    Prints one status line per code cell, since a chapter runs for minutes."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

    nb = nbformat.read(path, as_version=4)
    n_code = sum(c.cell_type == "code" for c in nb.cells)
    started, seen = time.perf_counter(), []

    def on_cell_start(cell, cell_index):
        if cell.cell_type != "code":  # nbclient calls this hook for markdown cells too
            return
        now = time.perf_counter()
        previous = f", the one before took {now - seen[-1]:.0f} s" if seen else ""
        seen.append(now)
        print(f"  {path.name}: cell {cell_index} ({len(seen)}/{n_code} code cells{previous}) ...", file=sys.stderr,
              flush=True)

    # The widget state is recorded (nbclient's ipywidgets Output handling fails without it), then scrub_outputs
    # drops it.
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(
        path.parent)}}, record_timing=False, on_cell_start=on_cell_start,
        on_notebook_start=lambda notebook: wait_in_slices(client.kc.shell_channel))
    env = kernel_env(profile)
    old = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        client.execute()
    except (CellExecutionError, CellTimeoutError, DeadKernelError) as error:  # a dead kernel: out of memory?
        raise RefreshError(f"{path.name}: a cell failed, the notebook was not written.\n{error}") from None
    finally:
        os.environ.clear()
        os.environ.update(old)
    return json.loads(nbformat.writes(nb)), time.perf_counter() - started


def refresh(path: Path, profile: str, timeout: int, versions: dict) -> float:
    """Execute one chapter and write it back with hashes, metadata, hidden solutions and clean outputs."""
    nb, seconds = execute(path, profile, timeout)
    scrub_outputs(nb)
    record_hashes(nb)
    hide_solutions(nb)
    nb["metadata"]["iteris"] = {"profile": profile, **versions, "seconds": round(seconds),
                                "load_average": round(os.getloadavg()[0], 1),  # context for "seconds"
                                "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    write(path, nb)
    return seconds


def restyle(path: Path) -> None:
    """Apply the current hiding and scrubbing rules to a chapter's committed outputs without running it (for a
    change of those rules); refused when the outputs are stale, since they would not match the code."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    problems = stale_cells(nb)
    if problems:
        raise RefreshError(f"{path.name}: {problems[0]}; run it (without --no-execute) to refresh its outputs.")
    scrub_outputs(nb)
    hide_solutions(nb)
    write(path, nb)


def write(path: Path, nb: dict) -> None:
    import nbformat

    staged = path.with_name(f".{path.name}.refresh")
    staged.write_text(nbformat.writes(nbformat.from_dict(nb)) + "\n", encoding="utf-8")  # Jupyter's own layout
    os.replace(staged, path)  # the chapter is replaced whole or not at all


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="chapters to refresh (default: notebooks/*.ipynb)")
    parser.add_argument("--profile", default="ci", choices=["ci", "cpu", "gpu"],
                        help="ITERIS_PROFILE of the run (default ci: the size CI executes)")
    # Generous: one ci cell of chapter 03 ran past 1200 s on a 2-core machine at load ~19.
    parser.add_argument("--timeout", type=int, default=3600, help="seconds one cell may run (default 3600)")
    parser.add_argument("--no-execute", action="store_true",
                        help="only re-apply the hiding and scrubbing rules to fresh committed outputs")
    args = parser.parse_args(argv)
    paths = args.notebooks or sorted(NOTEBOOKS.glob("*.ipynb"))
    missing = [str(p) for p in paths if not p.is_file() or p.suffix != ".ipynb"]
    if missing:
        print(f"refresh_outputs: not a notebook file: {', '.join(missing)}", file=sys.stderr)
        return 2
    if args.no_execute:
        try:
            for path in paths:
                restyle(path)
        except RefreshError as error:
            print(f"refresh_outputs: {error}", file=sys.stderr)
            return 1
        return 0
    versions = _versions()
    for path in paths:
        print(f"refresh_outputs: {path} (profile {args.profile}) ...", file=sys.stderr, flush=True)
        try:
            seconds = refresh(path.resolve(), args.profile, args.timeout, versions)
        except RefreshError as error:
            print(f"refresh_outputs: {error}", file=sys.stderr)
            return 1
        print(f"refresh_outputs: {path.name} refreshed in {seconds:.0f} s", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
