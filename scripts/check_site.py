"""Check the course site in a real browser: every page loads, every figure is there, math is rendered, solutions are
folded, nothing errors (issue 19). Run by hand after scripts/build_book.py, outside CI.

    python scripts/check_site.py site --screens runs/site-screens

Serves OUT on 127.0.0.1 (a free port; the site as a web server would serve it, so MathJax's fonts load as they
would online) and opens every top-level page in headless Chromium, with every request outside that server refused:
a page that needs the network fails here. For each page, after MathJax has finished:
- no console error, no uncaught exception, no failed request (a missing file is a 404);
- every <img> has loaded and decoded (complete, naturalWidth > 0);
- every math element of Sphinx (`.math`) holds a MathJax rendering (`mjx-container`), no MathJax error
  (`mjx-merror`), and no raw `\\(`, `\\[` or markdown table row (`|---`) is left in the page's text outside code;
- every cell tagged `solution` is folded: its code is not visible until the reader opens it.
Writes a full-page screenshot of each page to --screens (look at them). Prints one line per page; exit status 0
only if every page passes, 1 otherwise (with the reasons), 2 for a bad OUT.

Needs (this script installs nothing):
  apt-get install -y chromium                      # Debian's browser, at /usr/bin/chromium
  pip install -c constraints.txt -e ".[book]"     # includes playwright: the Python package only, no
                                                   # `playwright install`, no browser download
"""
from __future__ import annotations

import argparse
import functools
import http.server
import shutil
import sys
import threading
from pathlib import Path

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
MATHJAX_READY = "() => window.MathJax && MathJax.startup && MathJax.startup.promise.then(() => true)"
# Run in the page: what the checks need, gathered in one pass.
INSPECT = """() => {
  const images = Array.from(document.querySelectorAll('img')).map(img => ({
      src: img.getAttribute('src').slice(0, 80), ok: img.complete && img.naturalWidth > 0}));
  const maths = Array.from(document.querySelectorAll('.math'));
  const rendered = maths.filter(m => m.querySelector('mjx-container')).length;
  const errors = document.querySelectorAll('mjx-merror').length;
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  const raw = [];
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    if (node.parentElement.closest('pre, code, script, style, textarea, mjx-container')) continue;
    // raw TeX, or a markdown table rendered as text (|---|)
    if (/\\\\\\(|\\\\\\[|\\|\\s*:?---/.test(node.textContent)) raw.push(node.textContent.trim().slice(0, 60));
  }
  const solutions = Array.from(document.querySelectorAll('.tag_solution')).map(cell => {
    const code = cell.querySelector('.cell_input');
    return {folded: !!cell.querySelector('details:not([open])'), codeVisible: !!code && code.checkVisibility()};
  });
  return {images, maths: maths.length, rendered, errors, raw, solutions,
          title: document.title, height: document.body.scrollHeight};
}"""


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def serve(folder: Path) -> http.server.ThreadingHTTPServer:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def problems_of(report: dict, log: list[str]) -> list[str]:
    """The reasons a page fails, from INSPECT's report and the page's console/request log."""
    problems = list(log)
    broken = [i["src"] for i in report["images"] if not i["ok"]]
    if broken:
        problems.append(f"{len(broken)} image(s) not loaded: {broken[:3]}")
    if report["rendered"] < report["maths"] or report["errors"]:
        problems.append(f"math: {report['rendered']}/{report['maths']} rendered, {report['errors']} MathJax errors")
    if report["raw"]:
        problems.append(f"raw TeX or markdown table left in the text: {report['raw'][:3]}")
    shown = [i for i, s in enumerate(report["solutions"]) if not s["folded"] or s["codeVisible"]]
    if shown:
        problems.append(f"solution cell(s) {shown} visible without a click")
    return problems


def check(out: Path, screens: Path, chromium: str, timeout_ms: int) -> int:
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    pages = sorted(p.name for p in out.glob("*.html"))
    screens.mkdir(parents=True, exist_ok=True)
    server = serve(out)
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    failed = 0
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_FLAGS)
            context = browser.new_context(viewport={"width": 1280, "height": 900})
            # Only the site itself: anything else (a CDN, a font host) is refused and shows up as a failed request.
            context.route("**/*", lambda route: route.continue_() if route.request.url.startswith(base)
                          else route.abort())
            for name in pages:
                page, log = context.new_page(), []
                page.on("console", lambda m, log=log: log.append(f"console {m.type}: {m.text[:160]}")
                        if m.type == "error" else None)
                page.on("pageerror", lambda e, log=log: log.append(f"uncaught: {str(e)[:160]}"))
                page.on("requestfailed", lambda r, log=log: log.append(f"request failed: {r.url[:120]}"))
                page.on("response", lambda r, log=log: log.append(f"HTTP {r.status}: {r.url[:120]}")
                        if r.status >= 400 else None)
                try:
                    page.goto(base + name, wait_until="load", timeout=timeout_ms)
                    if page.evaluate("() => !!window.MathJax"):  # Sphinx's config object, even if the script is gone
                        try:
                            page.wait_for_function(MATHJAX_READY, timeout=timeout_ms)
                        except PlaywrightTimeout:
                            log.append(f"MathJax did not finish typesetting within {timeout_ms // 1000} s")
                    report = page.evaluate(INSPECT)
                    page.screenshot(path=str(screens / f"{Path(name).stem}.png"), full_page=True)
                except PlaywrightError as error:
                    report, log = None, log + [f"browser: {str(error).splitlines()[0][:160]}"]
                problems = problems_of(report, log) if report else log
                failed += bool(problems)
                summary = "" if report is None else (
                    f"{len(report['images'])} figures, {report['rendered']}/{report['maths']} math, "
                    f"{len(report['solutions'])} folded solutions, {report['height']} px")
                print(f"{'FAIL' if problems else 'ok  '} {name}: {summary}")
                for problem in problems:
                    print(f"     {problem}")
                page.close()
            browser.close()
    finally:
        server.shutdown()
    print(f"check_site: {len(pages) - failed} of {len(pages)} pages pass; screenshots in {screens}")
    return 1 if failed else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the site folder written by scripts/build_book.py")
    parser.add_argument("--screens", type=Path, default=Path("runs/site-screens"),
                        help="folder for the screenshots (default runs/site-screens)")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium",
                        help="the browser to drive (default: chromium on PATH)")
    parser.add_argument("--timeout", type=float, default=60, help="seconds a page may take to load and typeset")
    args = parser.parse_args(argv)
    if not (args.out / "index.html").is_file():
        print(f"check_site: {args.out} has no index.html; build the site first: python scripts/build_book.py "
              f"{args.out}", file=sys.stderr)
        return 2
    if not Path(args.chromium).is_file():
        print(f"check_site: no browser at {args.chromium}; apt-get install -y chromium, or pass --chromium PATH",
              file=sys.stderr)
        return 2
    try:
        import playwright  # noqa: F401
    except ImportError:
        print('check_site: playwright is not installed: pip install -c constraints.txt -e ".[book]"',
              file=sys.stderr)
        return 2
    return check(args.out, args.screens, args.chromium, int(args.timeout * 1000))


if __name__ == "__main__":
    sys.exit(main())
