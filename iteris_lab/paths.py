"""Where the shipped data lives: the trained LoRAs, the VLM vision tower and the diffusion UNet.

They are package data (`iteris_lab/data/`, declared in pyproject.toml), so a wheel install finds them the same
way a checkout does: through `importlib.resources`, never through a path relative to the source tree.
`ITERIS_DATA=/some/folder` replaces the whole folder (same layout: adapters/, vlm/, diffusion/); the tracks read
it when they are first imported.
"""
from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

ENV = "ITERIS_DATA"


def data_dir() -> Path:
    """`$ITERIS_DATA` if set, else the installed package's `iteris_lab/data` folder."""
    override = os.environ.get(ENV)
    if override:
        return Path(override).expanduser()
    root = resources.files(__package__) / "data"
    # Models load from real files; a package imported from a zip archive has none to give.
    if not isinstance(root, Path):
        raise FileNotFoundError(f"iteris_lab is imported from an archive ({root}); set {ENV} to a data folder")
    return root


def missing_data(path, what: str, script: str) -> FileNotFoundError:
    """The error for shipped data that is not where it should be: reinstall, point ITERIS_DATA, or retrain."""
    source = f"{ENV}={os.environ[ENV]}" if os.environ.get(ENV) else "the installed iteris_lab/data"
    return FileNotFoundError(
        f"no {what} at {path} (data folder: {source}). It ships with the iteris-lab package: reinstall it, or set "
        f"{ENV} to a folder with the same layout; in a source checkout, `python {script}` trains it again.")
