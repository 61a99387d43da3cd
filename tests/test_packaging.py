"""A regular (non-editable) install must carry configs/ and workers/ and find its configs."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # Build from a copy: an in-tree build leaves build/ behind, whose stale files would end
    # up in later wheels.
    src = tmp_path_factory.mktemp("src") / "vidgen"
    ignore = shutil.ignore_patterns(
        ".git", ".venv*", "build", "*.egg-info", "__pycache__", "*.mp4", "runs", "outputs"
    )
    shutil.copytree(ROOT, src, ignore=ignore)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(src),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
        ],
        check=True,
        capture_output=True,
    )
    (path,) = out.glob("vidgen-*.whl")
    return path


def test_wheel_contents(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in [
        "vidgen/configs/preview.yaml",
        "vidgen/configs/world/bouncing.yaml",
        "vidgen/configs/data/folder.yaml",
        "vidgen/cli.py",
        "workers/__init__.py",
    ]:
        assert required in names, required
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)


def test_installed_copy_composes_configs(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(site),
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    code = (
        "import vidgen, vidgen.config as c; "
        "print(vidgen.__file__); print(c.load_config('preview', ['world=agent']).world.size)"
    )
    # PYTHONPATH entries come before the editable install's finder, and cwd is not the repo:
    # this imports the installed copy only.
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out[0].startswith(str(site)) and out[1] == "64"
