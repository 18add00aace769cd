"""Exercise answers that stay hidden after Run All (issue 19).

A solution cell runs under nbval like any other cell, so its asserts keep the answer honest; what it prints is
shown folded — a "Show the answer" disclosure the reader opens after predicting — in JupyterLab, in the static
site and in the committed outputs alike.
"""
from __future__ import annotations

import html
import io
from contextlib import contextmanager, redirect_stdout


@contextmanager
def hidden_answer(summary: str = "Show the answer"):
    """Capture what the block prints and display it as a folded HTML <details> element (text/plain fallback: a
    one-line note, so a terminal or an nbval log does not give the answer away either)."""
    from IPython.display import display

    printed = io.StringIO()
    with redirect_stdout(printed):
        yield
    text = printed.getvalue()
    if text:
        display({"text/html": f"<details><summary>{html.escape(summary)}</summary><pre>{html.escape(text)}</pre>"
                              "</details>",
                 "text/plain": f"[{summary}: open this cell's output in Jupyter or the course site]"}, raw=True)
