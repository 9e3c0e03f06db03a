"""Reproducible artifacts (issue 20): two runs of every shipped recipe with the same inputs and seed
write byte-identical model.dsz / model.onnx / *.safetensors, and a run resumed after a kill (or from
any step's checkpoint) writes the same bytes as an uninterrupted one.

The recipes are the shipped ones with every training cut to one epoch; runs use 512 training and
256 test images at 2 threads (multi-threaded reductions must be deterministic too). Each pass runs
all recipes in one process, so the two runs are separate processes (hash-map orders, allocators).

Time budget: about 4 minutes on 2 cores for the whole file (three passes over 11 runs plus two
killed-and-resumed runs); the slow-marked test (full deep-compression twice) takes about 4 minutes.
"""

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from deepshrink.pipeline.recipe import RECIPES_DIR

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["--train-subset", "512", "--val-size", "256", "--test-subset", "256", "--threads", "2", "--no-progress"]
RUNS = [(path.stem, "lenet5") for path in sorted(RECIPES_DIR.glob("*.yaml"))] + [("deep_compression", "lenet300")]
ARTIFACT_SUFFIXES = (".dsz", ".onnx", ".safetensors")
PASS = """
import json, sys
from deepshrink.cli import main
for recipe, model, out in json.loads(sys.argv[1]):
    if main(["compress", model, "--recipe", recipe, "--out", out, *json.loads(sys.argv[2])]) != 0:
        sys.exit(f"{recipe} on {model} failed")
"""


def shrunk(node):
    """The recipe with every training cut to one epoch (and calibration to 128 images)."""
    if isinstance(node, dict):
        return {k: 1 if k == "epochs" else min(v, 128) if k == "calib_samples" else shrunk(v) for k, v in node.items()}
    if isinstance(node, list):
        return [shrunk(v) for v in node]
    return node


def run_name(recipe: str, model: str) -> str:
    return f"{recipe}-{model}"


def run_pass(jobs: list[tuple[Path, str, Path]], flags: list[str] = FLAGS) -> None:
    payload = json.dumps([[str(r), m, str(o)] for r, m, o in jobs])
    done = subprocess.run([sys.executable, "-c", PASS, payload, json.dumps(flags)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def artifact_hashes(folder: Path) -> dict[str, str]:
    files = sorted(p for p in folder.iterdir() if p.suffix in ARTIFACT_SUFFIXES)
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def checkpoints(folder: Path) -> list[Path]:
    return sorted(folder.glob("step*.safetensors"), key=lambda p: int(p.name[4:].split("_")[0]))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run A and run B of every (recipe, model), and run C: each resumed from run A's first and from
    all of its step checkpoints (as if killed after that checkpoint was written)."""
    root = tmp_path_factory.mktemp("reproducible")
    recipes = {}
    for stem, _ in RUNS:
        recipes[stem] = root / f"{stem}.yaml"
        recipes[stem].write_text(yaml.safe_dump(shrunk(yaml.safe_load((RECIPES_DIR / f"{stem}.yaml").read_text())), sort_keys=False))
    for side in ("a", "b"):
        run_pass([(recipes[r], m, root / side / run_name(r, m)) for r, m in RUNS])
    resumed = []
    for r, m in RUNS:
        done = root / "a" / run_name(r, m)
        steps = checkpoints(done)
        for keep in sorted({1, len(steps)} if steps else ()):
            folder = root / f"c{keep}" / run_name(r, m)
            folder.mkdir(parents=True)
            for path in [done / "recipe.yaml", *steps[:keep]]:
                shutil.copy(path, folder / path.name)
            resumed.append((recipes[r], m, folder))
    run_pass(resumed)
    return root, recipes


@pytest.mark.flow
@pytest.mark.parametrize(("recipe", "model"), RUNS)
def test_two_runs_write_the_same_bytes(runs, recipe, model):
    root, _ = runs
    a, b = (artifact_hashes(root / side / run_name(recipe, model)) for side in ("a", "b"))
    assert a and ("model.onnx" in a or recipe == "combined" and "model.qpack.safetensors" in a), a
    assert a == b
    reports = [json.loads((root / side / run_name(recipe, model) / "report.json").read_text()) for side in ("a", "b")]
    assert [s["top1"] for s in reports[0]["stages"]] == [s["top1"] for s in reports[1]["stages"]]
    record = reports[0]["determinism"]
    assert record["torch_threads"] == 2 and record["deterministic_algorithms"] == "warn" and record["cpu_capability"]


@pytest.mark.flow
@pytest.mark.parametrize(("recipe", "model"), RUNS)
def test_resumed_from_any_checkpoint_writes_the_same_bytes(runs, recipe, model):
    root, _ = runs
    name = run_name(recipe, model)
    expected = artifact_hashes(root / "a" / name)
    resumed = [folder for folder in sorted(root.glob(f"c*/{name}"))]
    assert len(resumed) == min(2, len(checkpoints(root / "a" / name)))
    for folder in resumed:
        assert artifact_hashes(folder) == expected, folder.parent.name


def kill_during_run(command: list[str], out: Path, delay: float) -> int:
    """Start the run and SIGKILL it ``delay`` seconds after its run folder appears; returns how many
    step checkpoints existed at the kill (-1: it finished first)."""
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while not (out / "recipe.yaml").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it started a run folder"
        time.sleep(0.01)
    time.sleep(delay)
    if proc.poll() is not None:
        return -1
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return len(checkpoints(out))


@pytest.mark.flow
@pytest.mark.parametrize("stratum", [0, 1, 2])
def test_killed_and_resumed_writes_the_same_bytes(runs, stratum):
    """deep-compression on lenet300 killed at a random moment in the first, middle or last third of
    run A's duration (before, during or after a step or its checkpoint write), then resumed: the same
    bytes as the uninterrupted run A."""
    root, recipes = runs
    done = root / "a" / run_name("deep_compression", "lenet300")
    duration = (done / "report.json").stat().st_mtime - (done / "recipe.yaml").stat().st_mtime
    delay = duration * (stratum + random.Random(stratum).random()) / 3
    out = root / f"killed{stratum}"
    command = [sys.executable, "-m", "deepshrink.cli", "compress", "lenet300", "--recipe", str(recipes["deep_compression"])]
    command += ["--out", str(out), *FLAGS]
    finished_steps = kill_during_run(command, out, delay)
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
    assert artifact_hashes(out) == artifact_hashes(done), f"killed after {delay:.2f}s with {finished_steps} checkpoints"
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.slow
def test_full_deep_compression_twice_writes_the_same_bytes(tmp_path):
    """The shipped recipe, full data, default threads: two runs, the same sha256 for every artifact."""
    jobs = [(RECIPES_DIR / "deep_compression.yaml", "lenet300", tmp_path / side) for side in ("a", "b")]
    for job in jobs:
        run_pass([job], ["--no-progress"])
    a, b = artifact_hashes(tmp_path / "a"), artifact_hashes(tmp_path / "b")
    assert {"model.dsz", "model.onnx", "step1_prune.safetensors", "step2_share.safetensors"} <= set(a)
    assert a == b


@pytest.mark.flow
def test_deterministic_flag_runs_strict_and_writes_the_same_bytes(runs, tmp_path):
    """``--deterministic`` makes any op without a deterministic kernel an error; on CPU every op the
    deep-compression recipe uses has one, so the strict run finishes and writes run A's bytes."""
    root, recipes = runs
    out = tmp_path / run_name("deep_compression", "lenet300")
    run_pass([(recipes["deep_compression"], "lenet300", out)], [*FLAGS, "--deterministic"])
    assert json.loads((out / "report.json").read_text())["determinism"]["deterministic_algorithms"] == "strict"
    assert artifact_hashes(out) == artifact_hashes(root / "a" / run_name("deep_compression", "lenet300"))
