"""Build the course as a static site from the chapters' committed outputs (issue 19). Nothing is executed.

    pip install -c constraints.txt -e ".[book]"       # jupyter-book 1 (Sphinx, myst-nb, sphinx-book-theme)
    python scripts/build_book.py site                 # site/index.html + one page per chapter
    python scripts/check_site.py site                 # every page in headless Chromium

Why Jupyter Book 1: Jupyter Book 2 (MyST) downloads its site theme at build time and fails offline; version 1 is
Sphinx and builds from the registry's packages alone. Sphinx loads MathJax from a CDN, so the pages would show raw
`\\(...\\)` without a network: this script copies MathJax 3 into the site (`_static/mathjax/`, with its Apache-2.0
LICENSE) and points `mathjax_path` at it. MathJax comes from the npm package `mathjax@3.2.2`: fetched once with
`npm pack` into ~/.cache/iteris-lab/ (node's npm is the only extra tool), or given with --mathjax (a `npm pack`
tarball or an unpacked package folder), so a build without any network works once the cache exists.

Steps: refuse stale chapters (tests/test_course.py's check: a code cell changed since its outputs were made) unless
--allow-stale; copy book/ (the Jupyter Book config and the front page) and notebooks/*.ipynb into a scratch source
folder; write its table of contents (the front page, then every chapter in file order) and the front page's table
of how each chapter's outputs were made; `jupyter-book build`; swap the HTML in for OUT. OUT must be new, empty, or
a site this script built (then --overwrite replaces it); anything else is refused, so no files of yours are lost.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"
NOTEBOOKS = ROOT / "notebooks"
MATHJAX_VERSION = "3.2.2"
MATHJAX_CACHE = Path.home() / ".cache" / "iteris-lab" / f"mathjax-{MATHJAX_VERSION}"
# What the pages need of the package: the TeX→CHTML bundle, the pieces it loads on demand (TeX extensions, the
# CHTML fonts, the menu and its accessibility parts) and the licence; not the other bundles or the speech engine.
MATHJAX_FILES = ["es5/tex-chtml.js", "es5/input", "es5/output/chtml", "es5/ui", "es5/a11y", "es5/adaptors", "LICENSE"]
MARKER = ".iteris-book"  # written into every site this script builds: the only folders --overwrite replaces
TABLE_SLOT = "<!-- chapters -->"


class BuildError(Exception):
    """The site cannot be built; the message says what to do."""


def _refresher():
    spec = importlib.util.spec_from_file_location("refresh_outputs", ROOT / "scripts" / "refresh_outputs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse an OUT that holds anything but a site built here (and that one without --overwrite)."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise BuildError(f"{out} exists and is not a folder; choose a new folder for the site.")
    resolved, here = out.resolve(), Path.cwd().resolve()
    if resolved in (here, ROOT, Path.home().resolve()) or resolved in here.parents or resolved in ROOT.parents:
        raise BuildError(f"{out} is the current folder, the checkout, the home folder or one of their parents; "
                         "build the site into a new subfolder (e.g. `site`).")
    if not out.exists() or not any(out.iterdir()):
        return
    if not (out / MARKER).is_file():
        raise BuildError(f"{out} holds files that are not a site built by this script; they are not replaced. "
                         "Choose another folder, or move its files away first.")
    if not overwrite:
        raise BuildError(f"{out} holds an earlier build; pass --overwrite to replace it.")


def chapters_fresh(paths: list[Path], allow_stale: bool) -> None:
    refresher = _refresher()
    stale = {p.name: problems for p in paths if (problems := refresher.stale_cells(json.loads(p.read_text())))}
    if not stale:
        return
    lines = "\n".join(f"  {name}: {problems[0]}" + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else "")
                      for name, problems in stale.items())
    message = (f"the outputs of {len(stale)} chapter(s) were not made from their current code:\n{lines}\n"
               f"run `python scripts/refresh_outputs.py {' '.join('notebooks/' + n for n in stale)}` first")
    if not allow_stale:
        raise BuildError(message + " (or pass --allow-stale to build from them anyway).")
    print(f"build_book: warning: {message}", file=sys.stderr)


def mathjax_package(given: Path | None) -> Path:
    """The unpacked npm package folder of MathJax (holding es5/ and LICENSE): --mathjax, else the cache, else
    `npm pack mathjax@VERSION` into the cache."""
    if given is not None:
        if given.is_dir():
            package = given / "package" if (given / "package" / "es5").is_dir() else given
            if not (package / "es5" / "tex-chtml.js").is_file():
                raise BuildError(f"--mathjax {given}: no es5/tex-chtml.js inside; give the folder of the unpacked "
                                 f"mathjax@{MATHJAX_VERSION} npm package or its .tgz from `npm pack`.")
            return package
        return _unpack(given)
    if (MATHJAX_CACHE / "package" / "es5" / "tex-chtml.js").is_file():
        return MATHJAX_CACHE / "package"
    if shutil.which("npm") is None:
        raise BuildError(f"MathJax is not cached in {MATHJAX_CACHE} and npm is not installed: install node/npm "
                         f"(apt-get install npm), or pass --mathjax with a `npm pack mathjax@{MATHJAX_VERSION}` "
                         "tarball.")
    with tempfile.TemporaryDirectory() as scratch:
        print(f"build_book: npm pack mathjax@{MATHJAX_VERSION} (once, into {MATHJAX_CACHE})", file=sys.stderr)
        done = subprocess.run(["npm", "pack", f"mathjax@{MATHJAX_VERSION}", "--pack-destination", scratch],
                              capture_output=True, text=True)
        tarballs = list(Path(scratch).glob("mathjax-*.tgz"))
        if done.returncode != 0 or not tarballs:
            raise BuildError(f"`npm pack mathjax@{MATHJAX_VERSION}` failed (no npm registry?): "
                             f"{done.stderr.strip()[-300:]}; pass --mathjax with the package tarball instead.")
        return _unpack(tarballs[0], MATHJAX_CACHE)


def _unpack(tarball: Path, into: Path | None = None) -> Path:
    if not tarball.is_file() or not tarfile.is_tarfile(tarball):
        raise BuildError(f"--mathjax {tarball}: not a folder or a .tgz from `npm pack mathjax@{MATHJAX_VERSION}`.")
    into = into or Path(tempfile.mkdtemp(prefix="mathjax-"))
    staging = Path(tempfile.mkdtemp(prefix=".mathjax-", dir=into.parent if into.parent.exists() else None))
    with tarfile.open(tarball) as archive:
        archive.extractall(staging, filter="data")
    if not (staging / "package" / "es5" / "tex-chtml.js").is_file():
        shutil.rmtree(staging)
        raise BuildError(f"{tarball} holds no package/es5/tex-chtml.js: not the mathjax@3 npm package.")
    into.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(into, ignore_errors=True)
    shutil.move(staging, into)
    return into / "package"


def chapter_title(nb: dict, fallback: str) -> str:
    for cell in nb["cells"]:
        if cell["cell_type"] == "markdown":
            for line in "".join(cell["source"]).splitlines():
                if line.startswith("# "):
                    return line[2:].strip()
    return fallback


def provenance_table(paths: list[Path]) -> str:
    """The front page's markdown table: how each chapter's committed outputs were made."""
    rows = ["| chapter | profile | iteris-lab | commit | refreshed (UTC) | run time | load |",
            "|---|---|---|---|---|---|---|"]
    for path in paths:
        nb = json.loads(path.read_text(encoding="utf-8"))
        meta = nb["metadata"].get("iteris", {})
        seconds = meta.get("seconds")
        rows.append(f"| [{chapter_title(nb, path.stem)}]({path.name}) | {meta.get('profile', 'not refreshed')} | "
                    f"{meta.get('iteris_lab', '')} | {meta.get('git_commit') or ''} | "
                    f"{meta.get('date', '').replace('T', ' ').rstrip('Z')} | "
                    f"{'' if seconds is None else f'{seconds} s'} | {meta.get('load_average', '')} |")
    return "\n".join(rows)


def write_source(source: Path, paths: list[Path], mathjax: Path) -> None:
    """The scratch Jupyter Book: book/ + the chapters + _toc.yml + MathJax in _vendor/ (served as _static/mathjax/)."""
    shutil.copytree(BOOK, source)
    for path in paths:
        shutil.copy2(path, source / path.name)
    toc = ["format: jb-book", "root: index", "chapters:"] + [f"- file: {p.stem}" for p in paths]
    (source / "_toc.yml").write_text("\n".join(toc) + "\n")
    index = source / "index.md"
    index.write_text(index.read_text().replace(TABLE_SLOT, provenance_table(paths)))
    # Not under _static/: Jupyter Book adds every .js found there to every page, and MathJax loads its own parts.
    target = source / "_vendor" / "mathjax"
    for name in MATHJAX_FILES:
        origin = mathjax / name
        destination = target / Path(name).relative_to("es5") if name.startswith("es5/") else target / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if origin.is_dir() else shutil.copy2)(origin, destination)


def build(out: Path, paths: list[Path], mathjax: Path, verbose: bool) -> None:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # this checkout's library, installed or not
    from iteris_lab.io.export import replace_folder  # the project's one staged folder swap

    with tempfile.TemporaryDirectory(prefix="iteris-book-") as scratch:
        source, build_dir = Path(scratch) / "src", Path(scratch) / "out"
        write_source(source, paths, mathjax)
        command = [sys.executable, "-c", "from jupyter_book.cli.main import main; main()", "build", str(source),
                   "--path-output", str(build_dir), "--builder", "html"]  # the console script, by this Python
        done = subprocess.run(command, capture_output=not verbose, text=True)
        html = build_dir / "_build" / "html"
        if done.returncode != 0 or not (html / "index.html").is_file():
            log = "" if verbose else (done.stdout + done.stderr)[-3000:]
            raise BuildError(f"jupyter-book build failed (exit {done.returncode}); rerun with --verbose.\n{log}")

        def fill(staging: Path) -> None:
            shutil.copytree(html, staging, dirs_exist_ok=True)
            (staging / MARKER).write_text("built by scripts/build_book.py; --overwrite may replace this folder\n")

        replace_folder(out, fill)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder for the site (new, empty, or an earlier build)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier build in OUT")
    parser.add_argument("--mathjax", type=Path, help=f"mathjax@{MATHJAX_VERSION} npm tarball or unpacked folder")
    parser.add_argument("--allow-stale", action="store_true", help="build even if a chapter needs a refresh")
    parser.add_argument("--verbose", action="store_true", help="show jupyter-book's own output")
    args = parser.parse_args(argv)
    paths = sorted(NOTEBOOKS.glob("*.ipynb"))
    started = time.perf_counter()
    try:
        if importlib.util.find_spec("jupyter_book") is None:
            raise BuildError('jupyter-book is not installed: pip install -c constraints.txt -e ".[book]"')
        if not paths:
            raise BuildError(f"no chapters in {NOTEBOOKS}")
        check_out(args.out, args.overwrite)
        chapters_fresh(paths, args.allow_stale)
        build(args.out, paths, mathjax_package(args.mathjax), args.verbose)
    except BuildError as error:
        print(f"build_book: {error}", file=sys.stderr)
        return 2
    pages = [args.out / "index.html"] + [args.out / f"{p.stem}.html" for p in paths]
    missing = [str(p) for p in pages if not p.is_file()]
    if missing:
        print(f"build_book: the build has no page for: {', '.join(missing)}", file=sys.stderr)
        return 1
    print(f"build_book: {len(pages)} pages in {args.out} ({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
