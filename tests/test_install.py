"""minisd as an installed package: `pip install` builds it with setuptools (pyproject.toml), and the
`minisd` command then works from any folder, with the bundled model and the BPE vocabulary found as
package data.

The build runs on a copy of the sources (so the checkout gets no build/ or egg-info), with
--no-build-isolation (setuptools from this environment: no download) and --no-deps (torch and the
rest are already here), into a --target folder: a few seconds, no virtual environment to create.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(600)
def test_pip_install_gives_the_minisd_command_from_any_folder(tmp_path):
    pytest.importorskip("setuptools")
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (REPO / name).exists():
            shutil.copy(REPO / name, source / name)
    skip = shutil.ignore_patterns("__pycache__")
    shutil.copytree(REPO / "minisd", source / "minisd", ignore=skip)
    target = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation"]
    result = subprocess.run(
        pip + ["--target", str(target), str(source)],
        capture_output=True,
        text=True,
        timeout=500,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (target / "minisd" / "assets" / "bundled.safetensors").is_file()
    assert (target / "minisd" / "assets" / "bpe_simple_vocab_16e6.txt.gz").is_file()

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # only the installed copy is importable: not the checkout, not the source copy
    env = {**os.environ, "PYTHONPATH": str(target), "PYTHONSAFEPATH": "1"}
    where = subprocess.run(
        [sys.executable, "-c", "import minisd; print(minisd.__file__)"],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120,
    )
    assert where.stdout.strip() == str(target / "minisd" / "__init__.py"), where.stderr
    generate = subprocess.run(
        [str(target / "bin" / "minisd"), "generate", "a red circle on the left", "--steps", "2",
         "--seed", "0", "--quiet", "--out", "picture.png"],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300,
    )
    assert generate.returncode == 0, generate.stderr[-3000:]
    assert Image.open(elsewhere / "picture.png").size == (256, 256)
    bench = subprocess.run(
        [str(target / "bin" / "minisd"), "bench", "--help"],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120,
    )
    assert bench.returncode == 0 and "bench" in bench.stdout
