"""The package as a user installs it: a wheel built from the repository carries the shipped data, the data
locator finds it inside the installed package (not the source tree), and the core import needs no optional extra."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from iteris_lab import paths

ROOT = Path(__file__).resolve().parents[1]
# The stacks that pyproject.toml declares as extras; the core import must load none of them.
OPTIONAL = ("seaborn", "matplotlib", "pandas", "ipywidgets", "IPython", "gguf", "sklearn", "diffusers", "datasets")
CORE_MODULES = ("iteris_lab", "iteris_lab.cli", "iteris_lab.measure", "iteris_lab.tracks.harness",
                "iteris_lab.tracks.llm.evaluate", "iteris_lab.tracks.llm.tasks", "iteris_lab.tracks.llm.models")


def shipped_files() -> set[str]:
    """Every file under iteris_lab/data in the checkout, as a wheel names it."""
    return {p.relative_to(ROOT).as_posix() for p in (ROOT / "iteris_lab" / "data").rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built offline from a copy of the project (the checkout gets no build/ or egg-info from the test)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "iteris_lab", src / "iteris_lab", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    "-w", str(tmp / "dist"), str(src)], check=True, capture_output=True, timeout=120)
    (whl,) = (tmp / "dist").glob("iteris_lab-*.whl")
    return whl


def test_the_checkout_has_shipped_data_of_every_track():
    tops = {Path(f).parts[2] for f in shipped_files()}
    assert tops == {"adapters", "vlm", "diffusion"}


def test_the_wheel_carries_every_shipped_data_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert shipped_files() <= names
    assert "iteris_lab/data/adapters/minilm/topic/adapter_model.safetensors" in names


def test_the_wheel_carries_every_module_of_the_core_tracks_and_viz(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "iteris_lab").rglob("*.py")}
    assert {"iteris_lab/tracks/hub/vlm.py", "iteris_lab/viz/plots.py", "iteris_lab/measure.py"} <= modules
    assert modules <= names


def test_the_wheel_requires_no_optional_stack_by_default(wheel):
    with zipfile.ZipFile(wheel) as z:
        (meta,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        lines = z.read(meta).decode().splitlines()
    core = {re.split(r"[<>=!~;\[ ]", line.split(":", 1)[1].strip())[0] for line in lines
            if line.startswith("Requires-Dist:") and "extra ==" not in line}
    assert "torch" in core
    assert not core & {"seaborn", "matplotlib", "pandas", "ipywidgets", "gguf", "scikit-learn", "diffusers", "datasets"}


def test_installed_wheel_finds_its_data_from_any_folder_and_imports_no_extra(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script = (
        "import importlib, json, sys\n"
        f"for m in {CORE_MODULES!r}: importlib.import_module(m)\n"
        "import iteris_lab\n"
        "from iteris_lab import paths\n"
        "from iteris_lab.tracks.llm import track\n"
        "print(json.dumps({'package': iteris_lab.__file__, 'data': str(paths.data_dir()),\n"
        "                  'adapters': str(track.shipped_adapters()),\n"
        f"                  'optional': [o for o in {OPTIONAL!r} if o in sys.modules]}}))\n")
    env = {k: v for k, v in os.environ.items() if k != paths.ENV} | {"PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", script], cwd=elsewhere, env=env, check=True, capture_output=True,
                         text=True, timeout=600)  # importing torch on a loaded 2-core machine can take minutes
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(found["package"]).is_relative_to(site)  # the wheel's copy, not the checkout's
    assert Path(found["data"]) == site / "iteris_lab" / "data"
    assert (Path(found["adapters"]) / "minilm" / "topic" / "adapter_config.json").is_file()
    assert found["optional"] == []


def test_iteris_data_replaces_the_data_folder(monkeypatch, tmp_path):
    monkeypatch.setenv(paths.ENV, str(tmp_path))
    assert paths.data_dir() == tmp_path
    monkeypatch.delenv(paths.ENV)
    assert paths.data_dir() == ROOT / "iteris_lab" / "data"


def test_missing_data_names_reinstall_the_override_and_the_script():
    message = str(paths.missing_data("/nowhere/x", "trained LoRA", "scripts/train_loras.py --model minilm"))
    assert "/nowhere/x" in message and "reinstall" in message and paths.ENV in message
    assert "scripts/train_loras.py --model minilm" in message


def test_help_and_version_import_no_torch_and_the_api_loads_on_first_use():
    """`iteris-lab --help` / `--version` answer without importing torch (lazy names, PEP 562); the public names
    still import as before."""
    script = (
        "import sys, contextlib, io\n"
        "from iteris_lab.cli import build_parser\n"
        "for argv in (['--help'], ['--version'], ['merge', '--help']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        try: build_parser().parse_args(argv)\n"
        "        except SystemExit: pass\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'torch imported'\n"
        "from iteris_lab import merge_loras, MergeResult, tokenize, IterisError, __version__\n"
        "import iteris_lab\n"
        "assert set(iteris_lab.__all__) <= set(dir(iteris_lab)) and 'torch' in sys.modules\n"
        "print(__version__)\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=True, capture_output=True, text=True,
                         timeout=600)  # importing torch on a loaded 2-core machine can take minutes
    assert out.stdout.strip() == project_version()


def project_version() -> str:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def test_python_m_iteris_lab_prints_the_version():
    out = subprocess.run([sys.executable, "-m", "iteris_lab", "--version"], cwd=ROOT, check=True,
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == f"iteris-lab {project_version()}"
