"""Durable writes: a writer killed with SIGKILL at a random moment during ``pack`` or ``save_weights``
leaves the target as the old file or the new one, whole, and no temp file survives the next write.

Time budget: under 60 s on 2 cores for the file (measured about 20 s): lenet5-sized models, writers
forked from the test process (no interpreter start per kill).
"""

import json
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch

from deepshrink.core.files import remove_stale_temps, write_atomic, write_safetensors
from deepshrink.encode.pack import pack
from deepshrink.models import create_model
from deepshrink.models.weights import save_weights

KILLS = 100


def temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def two_models() -> list[torch.nn.Module]:
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(create_model("lenet5"))
    return models


def forked(write) -> int:
    """Run ``write()`` in a child process (a copy of this one); returns its pid."""
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        try:
            write()
        finally:
            os._exit(0)
    return pid


def timed(write) -> float:
    pid, start = forked(write), time.perf_counter()
    os.waitpid(pid, 0)
    return time.perf_counter() - start


@pytest.mark.unit
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.parametrize("writer", ["pack", "save_weights"])
def test_sigkill_leaves_old_or_new_file_whole(tmp_path, writer):
    target = tmp_path / ("model.dsz" if writer == "pack" else "model.safetensors")
    write = pack if writer == "pack" else save_weights
    versions = []
    for i, model in enumerate(two_models()):  # each version's exact bytes (writes are deterministic)
        write(model, tmp_path / f"v{i}{target.suffix}")
        versions.append((tmp_path / f"v{i}{target.suffix}").read_bytes())
    assert versions[0] != versions[1]
    models = two_models()
    write(models[0], target)
    span = 1.2 * max(timed(lambda: write(models[1], tmp_path / "probe")) for _ in range(2))
    rng = random.Random(20)
    outcomes = {"old": 0, "new": 0, "temp left": 0}
    current = 0
    for _ in range(KILLS):
        pid = forked(lambda new=1 - current: write(models[new], target))
        time.sleep(rng.uniform(0, span))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        data = target.read_bytes()
        assert data in versions, f"{target.name} is neither the old nor the new file ({len(data)} bytes)"
        outcome = "old" if data == versions[current] else "new"
        outcomes[outcome] += 1
        current = versions.index(data)
        leftovers = temp_files(tmp_path)
        assert len(leftovers) <= 1, leftovers  # the next write sweeps a killed writer's temp file
        outcomes["temp left"] += len(leftovers)
    print(writer, outcomes)
    # kills landed before the write, inside it (a temp file left) and after the rename
    assert outcomes["old"] and outcomes["new"] and outcomes["temp left"], outcomes
    write(models[0], target)
    assert target.read_bytes() == versions[0]
    assert temp_files(tmp_path) == [], outcomes


@pytest.mark.unit
def test_write_atomic_replaces_and_sweeps_only_dead_writers(tmp_path):
    target = tmp_path / "a.bin"
    dead = os.fork()
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)
    stale = tmp_path / f".a.bin.{dead}.0000.tmp"
    live = tmp_path / f".a.bin.{os.getppid()}.0000.tmp"  # our parent is alive: its write is in flight
    other = tmp_path / f".b.bin.{dead}.0000.tmp"  # another target's temp is not ours to remove
    for p in (stale, live, other):
        p.write_bytes(b"x")
    write_atomic(target, b"new")
    assert target.read_bytes() == b"new"
    assert not stale.exists() and live.exists() and other.exists()
    assert remove_stale_temps(tmp_path / "b.bin") == [other]


@pytest.mark.unit
def test_write_error_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "a.bin"
    write_atomic(target, b"old")

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, b"new")
    assert target.read_bytes() == b"old" and temp_files(tmp_path) == []


@pytest.mark.unit
def test_safetensors_bytes_do_not_depend_on_metadata_order(tmp_path):
    """safetensors keeps metadata in a hash map whose order changes per process; ours is sorted."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    tensors = {"w": torch.arange(6.0).view(2, 3), "b": torch.ones(2)}
    metadata = {k: f"{i}é" for i, k in enumerate("qwertyuiop")}
    a = write_safetensors(tmp_path / "a.safetensors", tensors, metadata).read_bytes()
    b = write_safetensors(tmp_path / "b.safetensors", tensors, dict(reversed(metadata.items()))).read_bytes()
    assert a == b
    loaded = load_file(tmp_path / "a.safetensors")
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    with safe_open(str(tmp_path / "a.safetensors"), "pt") as handle:
        assert handle.metadata() == metadata
    header_length = int.from_bytes(a[:8], "little")
    assert header_length % 8 == 0  # tensor data stays aligned
    header = json.loads(a[8 : 8 + header_length])
    assert list(header["__metadata__"]) == sorted(metadata)
