"""minisd as an installed package: `pip install` builds it with setuptools (pyproject.toml), and the
`minisd` command then works from any folder, with the bundled model and the BPE vocabulary found as
package data. Both ways the README names: `pip install -e .` in a fresh virtual environment, and
`pip install .` (here into a --target folder).

Everything runs offline and leaves this interpreter's site-packages alone:
- The venv is made --without-pip: ensurepip would put its own old setuptools (65 for Python 3.11,
  without bdist_wheel) in front of this environment's. pip runs as `venv/bin/python -m pip`: the
  pip package seen through --system-site-packages, run by the venv's interpreter, so it installs
  into the venv (and leaves alone a minisd installed outside it). The system interpreter never
  runs pip.
- --no-build-isolation: an isolated build would download setuptools from PyPI into a throw-away
  environment; without isolation the build uses the setuptools of this environment, seen through
  --system-site-packages (pyproject.toml asks for setuptools>=64, the first with PEP 660 editable
  installs).
- --no-deps: torch and the rest are already installed system-wide, also seen through
  --system-site-packages.
- The build runs on a copy of the sources, so the checkout gets no build/ or egg-info.
"""
from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PROMPT = "a red circle on the left"


def copy_sources(folder: Path) -> Path:
    """What the build reads: pyproject.toml, the readme it names, the licence, the package."""
    folder.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (REPO / name).exists():
            shutil.copy(REPO / name, folder / name)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "minisd", folder / "minisd", ignore=skip)
    return folder


def clean_env(**extra) -> dict:
    """This environment without PYTHONPATH (the tests may run with the checkout on it)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INDEX": "1", **extra}


def run(command: list, **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("env", clean_env())
    return subprocess.run([str(c) for c in command], capture_output=True, text=True, **kwargs)


def system_site_packages() -> dict:
    return {folder: sorted(os.listdir(folder)) for folder in site.getsitepackages()
            if os.path.isdir(folder)}


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    pytest.importorskip("setuptools")
    pytest.importorskip("pip")
    before = system_site_packages()
    folder = tmp_path_factory.mktemp("install") / "venv"
    made = run(
        [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", folder],
        timeout=300,
    )
    assert made.returncode == 0, made.stderr[-3000:]
    yield folder
    assert system_site_packages() == before  # nothing installed into or removed from this Python
    shutil.rmtree(folder, ignore_errors=True)


def generate_from(minisd_command: Path, elsewhere: Path, env: dict) -> None:
    done = run(
        [minisd_command, "generate", PROMPT, "--steps", "2", "--seed", "0", "--quiet",
         "--out", "picture.png"],
        cwd=elsewhere, env=env, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    with Image.open(elsewhere / "picture.png") as image:  # 32×32 enlarged 8× (README)
        assert image.size == (256, 256) and image.format == "PNG"


@pytest.mark.timeout(600)
def test_editable_install_in_a_fresh_venv_gives_the_minisd_command(venv, tmp_path):
    # the checkout may hold an egg-info already (README command 1 is `pip install -e .`, as
    # .ci/run runs it): the build must leave whatever is there as it was
    egg_info = REPO / "minisd.egg-info"
    egg_info_before = egg_info.stat().st_mtime_ns if egg_info.exists() else None
    source = copy_sources(tmp_path / "source")
    pip = [venv / "bin" / "python", "-m", "pip", "install", "--quiet", "--no-deps",
           "--no-build-isolation"]
    installed = run(pip + ["-e", source], timeout=500)
    assert installed.returncode == 0, installed.stderr[-3000:]

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # editable: the venv's python imports the source folder itself, not a copy in site-packages
    # (nor the checkout, nor any minisd this interpreter may have installed)
    where = run([venv / "bin" / "python", "-c", "import minisd; print(minisd.__file__)"],
                cwd=elsewhere, timeout=120)
    assert where.stdout.strip() == str(source / "minisd" / "__init__.py"), where.stderr
    generate_from(venv / "bin" / "minisd", elsewhere, clean_env())
    assert not (elsewhere / "minisd").exists()
    assert (egg_info.stat().st_mtime_ns if egg_info.exists() else None) == egg_info_before


@pytest.mark.timeout(600)
def test_pip_install_gives_the_minisd_command_from_any_folder(venv, tmp_path):
    source = copy_sources(tmp_path / "source")
    target = tmp_path / "site"
    pip = [venv / "bin" / "python", "-m", "pip", "install", "--quiet", "--no-deps",
           "--no-build-isolation"]
    installed = run(pip + ["--target", target, source], timeout=500)
    assert installed.returncode == 0, installed.stderr[-3000:]
    assert (target / "minisd" / "assets" / "bundled.safetensors").is_file()
    assert (target / "minisd" / "assets" / "bpe_simple_vocab_16e6.txt.gz").is_file()

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # only the installed copy is importable: not the checkout, not the source copy
    env = clean_env(PYTHONPATH=str(target), PYTHONSAFEPATH="1")
    # the venv's python: the one the installed command's first line names
    where = run([venv / "bin" / "python", "-c", "import minisd; print(minisd.__file__)"],
                cwd=elsewhere, env=env, timeout=120)
    assert where.stdout.strip() == str(target / "minisd" / "__init__.py"), where.stderr
    generate_from(target / "bin" / "minisd", elsewhere, env)
    bench = run([target / "bin" / "minisd", "bench", "--help"], cwd=elsewhere, env=env,
                timeout=120)
    assert bench.returncode == 0 and "bench" in bench.stdout
