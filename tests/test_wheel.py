"""The package as a user gets it: a wheel built from the checkout, installed into a fresh
virtual environment and run from outside the checkout (shipped recipes, pretrained
weights and the ``deepshrink`` entry point must all be inside the wheel).

The fresh environment takes the wheel alone (``--no-deps``); the dependencies are the
pinned ones this interpreter already has, reached through a ``.pth`` path entry (which,
unlike a site directory, runs none of that environment's ``.pth`` hooks, so the
checkout's editable install stays out of sight). That keeps the test to seconds
instead of reinstalling torch, and still fails on anything missing from the wheel.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.flow


def run(*argv, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def build_wheel(tmp: Path) -> Path:
    """Build from a copy of the sources, so the build leaves nothing (build/, egg-info) in the checkout."""
    source = tmp / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "deepshrink", source / "deepshrink", ignore=shutil.ignore_patterns("__pycache__"))
    done = run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp / "dist", source, cwd=tmp)
    assert done.returncode == 0, done.stderr
    (wheel,) = (tmp / "dist").glob("deepshrink-*.whl")
    return wheel


def fresh_venv(tmp: Path, wheel: Path) -> Path:
    venv = tmp / "venv"
    done = run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp)
    assert done.returncode == 0, done.stderr
    python = venv / "bin" / "python"
    done = run(sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel, cwd=tmp)
    assert done.returncode == 0, done.stderr
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp).stdout.strip())
    (site / "_pinned_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


def test_wheel_installs_and_runs_outside_the_checkout(tmp_path):
    wheel = build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "deepshrink/recipes/deep_compression.yaml" in names and "deepshrink/models/pretrained/manifest.json" in names
    assert len([n for n in names if n.startswith("deepshrink/recipes/") and n.endswith(".yaml")]) == len(
        list((ROOT / "deepshrink/recipes").glob("*.yaml"))
    )
    venv = fresh_venv(tmp_path, wheel)
    outside = tmp_path / "elsewhere"
    outside.mkdir()

    where = run(venv / "bin" / "python", "-c", "import deepshrink; print(deepshrink.__file__)", cwd=outside)
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(venv)  # the wheel's copy, not the checkout's

    plan = run(venv / "bin" / "deepshrink", "compress", "lenet300", "--recipe", "deep-compression", "--dry-run", cwd=outside)
    assert plan.returncode == 0, plan.stderr
    lines = plan.stdout.splitlines()
    assert lines[0] == "recipe deep-compression on lenet300:"
    assert [line.split(":")[0] for line in lines[1:]] == ["1. prune", "2. share", "3. pack"]
    assert "'sparsity': 0.93" in lines[1] and "'linear_bits': 5" in lines[2]
    assert list(outside.iterdir()) == []  # a dry run writes nothing

    zoo = run(venv / "bin" / "deepshrink", "models", "--json", cwd=outside)
    assert zoo.returncode == 0, zoo.stderr
    rows = {row["model"]: row for row in json.loads(zoo.stdout)}
    assert rows["lenet300"]["params"] == 266_610 and rows["lenet300"]["pretrained"] and rows["lenet300"]["test_top1"] == 89.69
    assert rows["resnet20"]["test_top1"] == 93.25
