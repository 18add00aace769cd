"""Check a chapter's ipywidgets in a real browser: JupyterLab under headless Chromium, run all cells, move a
slider, and require that the figure under it changes. Run by hand, outside CI (issue 14).

    python scripts/check_widgets.py notebooks/02_features.ipynb --slider 0 --out runs/widgets/02

Steps: start `jupyter lab` on 127.0.0.1 (a free port, a random token, temporary settings/workspace folders, the
notebook windowing off so every cell is in the page) with ITERIS_PROFILE=ci for its kernels; open the notebook in
Chromium; run all cells and wait until the kernel is idle and no cell is queued; take slider number `--slider`
(0-based, in page order, over every ipywidgets slider of the notebook), screenshot the widget's output area, press
the Right arrow `--steps` times on the slider's handle, wait for the redraw, screenshot again and compare. Writes
full-page and output-area screenshots (before/after) to `--out`. Exit status 0 only when the slider was found, its
value readout changed, the output area holds an image, and that image changed; 1 otherwise, with the reason.

Needs (this script installs nothing):
  apt-get install -y chromium chromium-driver     # Debian's browser, at /usr/bin/chromium
  pip install -c constraints.txt -e ".[dev]"      # jupyterlab, ipywidgets, ipykernel (the `notebooks` extra)
  pip install playwright                           # the Python package only: no `playwright install`, no browser
                                                   # download; it drives /usr/bin/chromium (--chromium)
"""
from __future__ import annotations

import argparse
import hashlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SLIDERS = ".jp-OutputArea-output .widget-slider"  # ipywidgets 8: IntSlider, FloatSlider, FloatLogSlider, ...
# JavaScript run in the page, on the notebook's model (window.jupyterapp, exposed by --LabApp.expose_app_in_browser)
CODE_CELLS = ("const nb = jupyterapp.shell.currentWidget; const kernel = () => nb.sessionContext.session.kernel;"
              " const cells = nb.content.widgets.filter(c => c.model.type === 'code');")
ERRORS = "cells.filter(c => Array.from({length: c.model.outputs.length}, (_, i) => c.model.outputs.get(i))" \
         ".some(o => o.type === 'error')).length"


class CheckFailed(Exception):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_lab(port: int, token: str, scratch: Path, log) -> subprocess.Popen:
    """JupyterLab serving `scratch/work` (a copy of the notebook: Lab autosaves, the checkout stays untouched);
    settings, workspaces and runtime files in `scratch` too."""
    settings = scratch / "settings" / "@jupyterlab" / "notebook-extension"
    settings.mkdir(parents=True)
    # every cell rendered (no virtual scrolling), so all sliders of the notebook are in the page
    (settings / "tracker.jupyterlab-settings").write_text('{"windowingMode": "none"}')
    news = scratch / "settings" / "@jupyterlab" / "apputils-extension"
    news.mkdir(parents=True)
    (news / "notification.jupyterlab-settings").write_text('{"fetchNews": "false"}')
    env = {**os.environ, "JUPYTERLAB_SETTINGS_DIR": str(scratch / "settings"),
           "JUPYTERLAB_WORKSPACES_DIR": str(scratch / "workspaces"),
           "JUPYTER_RUNTIME_DIR": str(scratch / "runtime"), "ITERIS_PROFILE": os.environ.get(
               "ITERIS_PROFILE", "ci"), "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    command = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
               f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={scratch / 'work'}",
               "--LabApp.expose_app_in_browser=True",  # window.jupyterapp: run cells through Lab's own commands
               "--LabApp.extension_manager=readonly", "--LabApp.news_url=None"]  # nothing fetched from outside
    if os.geteuid() == 0:
        command.append("--allow-root")
    server = subprocess.Popen(command, cwd=scratch / "work", env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if server.poll() is not None:
            raise CheckFailed(f"jupyter lab exited with status {server.returncode} (see {log.name})")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=2)
            return server
        except OSError:
            time.sleep(1)
    raise CheckFailed("jupyter lab did not answer within 120 s")


def stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)  # the server and the kernels it started
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


def run_all_and_wait(page, timeout_s: float) -> float:
    """Run every cell through JupyterLab's own command; return the seconds until the kernel is idle again."""
    page.wait_for_function("() => window.jupyterapp?.shell.currentWidget?.sessionContext?.session?.kernel?.status"
                           " === 'idle'", timeout=180_000)
    start = time.time()
    page.evaluate("() => jupyterapp.commands.execute('notebook:run-all-cells')")
    # done: the kernel is idle and every code cell has an execution count, or one holds an error (Lab stops there)
    page.wait_for_function(f"() => {{ {CODE_CELLS} const done = cells.every(c => c.model.executionCount !== null);"
                           f" return (done || {ERRORS} > 0) && kernel().status === 'idle'; }}",
                           timeout=timeout_s * 1000, polling=1000)
    return time.time() - start


def check(notebook: Path, slider_index: int, steps: int, out: Path, chromium: str, timeout_s: float) -> dict:
    from playwright.sync_api import sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="iteris_widgets_"))
    work = scratch / "work"
    # the checkout's layout, with the notebook's own folder a copy (Lab autosaves outputs into what it opens) and
    # everything else linked, so that a chapter's relative paths (../benchmarks/results/...) resolve
    folder = notebook.resolve().parent
    (work / folder.relative_to(ROOT)).mkdir(parents=True)
    for entry in ROOT.iterdir():
        if entry != folder and not (work / entry.name).exists():
            (work / entry.name).symlink_to(entry)
    shutil.copy(notebook, work / folder.relative_to(ROOT) / notebook.name)
    port, token = free_port(), secrets.token_hex(16)
    log = open(out / "jupyterlab.log", "w")
    server = start_lab(port, token, scratch, log)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch_persistent_context(
                str(scratch / "chromium-profile"), executable_path=chromium, headless=True, args=CHROMIUM_FLAGS,
                viewport={"width": 1400, "height": 1000})
            page = browser.new_page()
            try:
                path = (notebook.resolve().parent / notebook.name).relative_to(ROOT).as_posix()
                result = _drive(page, port, token, path, slider_index, steps, out, timeout_s)
            except Exception:
                page.screenshot(path=str(out / "failure.png"), full_page=True)
                raise
            browser.close()
    finally:
        stop(server)
        log.close()
        shutil.rmtree(scratch, ignore_errors=True)
    return result


def _drive(page, port: int, token: str, name: str, slider_index: int, steps: int, out: Path, timeout_s: float):
    """Open the notebook, run it, move the slider; the report of check()."""
    page.goto(f"http://127.0.0.1:{port}/lab/tree/{name}?token={token}", timeout=120_000)
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=120_000)
    seconds = run_all_and_wait(page, timeout_s)
    tracebacks = page.evaluate(f"() => {{ {CODE_CELLS} return {ERRORS}; }}")
    page.screenshot(path=str(out / "notebook.png"), full_page=True)
    if tracebacks:
        raise CheckFailed(f"{tracebacks} cell(s) raised an error (see notebook.png)")
    sliders = page.locator(SLIDERS)
    n_sliders = sliders.count()
    if n_sliders <= slider_index:
        raise CheckFailed(f"slider {slider_index} asked for, the page has {n_sliders}")
    slider = sliders.nth(slider_index)
    widget = slider.locator("xpath=ancestor::div[contains(@class, 'widget-vbox')][1]")
    figure = widget.locator(".widget-output img").first
    slider.scroll_into_view_if_needed()
    figure.wait_for(timeout=60_000)
    readout = slider.locator(".widget-readout")
    before_value, before_image = readout.inner_text(), figure.get_attribute("src")
    widget.screenshot(path=str(out / "before.png"))
    handle = slider.locator(".noUi-handle")
    handle.focus()
    for _ in range(steps):
        handle.press("ArrowRight")
    page.wait_for_function("([el, src]) => { const img = el.querySelector('.widget-output img');"
                           " return img && img.getAttribute('src') !== src; }",
                           arg=[widget.element_handle(), before_image], timeout=120_000, polling=500)
    page.wait_for_timeout(1000)  # let the new figure finish painting before the screenshot
    after_value, after_image = readout.inner_text(), figure.get_attribute("src")
    widget.screenshot(path=str(out / "after.png"))
    digest = {k: hashlib.sha256(v.encode()).hexdigest()[:12] for k, v in (("before", before_image),
                                                                       ("after", after_image))}
    return {"notebook": name, "run_all_seconds": round(seconds, 1), "sliders": n_sliders,
            "value": (before_value, after_value), "image sha256": digest, "tracebacks": tracebacks}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebook", type=Path, help="a notebook inside this repository")
    parser.add_argument("--slider", type=int, default=0, help="which slider, 0-based in page order (default 0)")
    parser.add_argument("--steps", type=int, default=4, help="Right-arrow presses on the slider (default 4)")
    parser.add_argument("--out", type=Path, default=None, help="screenshot folder (default runs/widgets/<notebook>)")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed for running all cells")
    args = parser.parse_args(argv)
    out = args.out or ROOT / "runs" / "widgets" / args.notebook.stem
    from playwright.sync_api import Error as PlaywrightError

    try:
        report = check(args.notebook, args.slider, args.steps, out, args.chromium, args.timeout)
    except (CheckFailed, PlaywrightError) as error:
        print(f"FAILED: {error}", file=sys.stderr)
        return 1
    print(report)
    failures = []
    if report["value"][0] == report["value"][1]:
        failures.append("the slider's readout did not change")
    if report["image sha256"]["before"] == report["image sha256"]["after"]:
        failures.append("the figure did not change")
    if report["tracebacks"]:
        failures.append(f"{report['tracebacks']} cells end in an error")
    for failure in failures:
        print("FAILED:", failure, file=sys.stderr)
    print("screenshots:", out)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
