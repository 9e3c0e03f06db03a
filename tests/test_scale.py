"""Devices, torchrun data parallelism and the study on Ray, on this machine's CPU.

Budget (2 shared cores): the unit tests take seconds; the two-process gloo test
~25 s; each torchrun recipe run ~30 s; each two-cell study ~30 s (process pool and
local Ray). CUDA paths are checked for their errors here; they run only on a GPU.
"""

import contextlib
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch.utils.data import DistributedSampler

from deepshrink import cli
from deepshrink.core.errors import InputError
from deepshrink.data import load_data
from deepshrink.distributed import World, broadcast_, checksum, launch, ranks_agree, resolve_backend, resolve_device, world_from_env
from deepshrink.models import create_model
from deepshrink.train import TrainConfig, Trainer, TrainHook, train

unit = pytest.mark.unit
flow = pytest.mark.flow
ROOT = Path(__file__).resolve().parents[1]
NO_CUDA = not torch.cuda.is_available()

# One DDP epoch vs one process: lenet5 has no BatchNorm and no dropout, so the only
# difference between the runs is the order of the floating-point sums (two local means
# averaged by all-reduce vs one mean of the global batch): ~1e-7 relative per step.
# Over 8 SGD steps with momentum that stays below 1e-5; a wrong shard or batch moves
# weights by ~1e-3 or more.
DDP_ATOL, DDP_RTOL = 1e-5, 1e-4
DDP_CONFIG = TrainConfig(epochs=1, batch_size=64, lr=0.05, weight_decay=0.0, schedule="cosine", channels_last=False, device="cpu")
SUBSET = 512  # 8 global batches of 64
DATA = {"train_subset": SUBSET, "test_subset": 256, "val_size": 256}


# -- devices and launch errors ----------------------------------------------------------


@unit
def test_device_names_and_errors():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("tpu", "cuda:x", "gpu0", ""):
        with pytest.raises(InputError, match="unknown device"):
            resolve_device(bad)
    with pytest.raises(InputError, match="unknown device 'mps'"):
        TrainConfig(device="mps")
    with pytest.raises(InputError, match="pins every rank to one GPU" if not NO_CUDA else "sees no CUDA GPU"):
        resolve_device("cuda:0", World(0, 2, 0))


@unit
@pytest.mark.skipif(not NO_CUDA, reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_and_nccl_without_a_gpu_are_one_line_errors():
    with pytest.raises(InputError, match="sees no CUDA GPU; use --device cpu"):
        resolve_device("cuda")
    with pytest.raises(InputError, match="nccl needs CUDA GPUs"):
        resolve_backend("nccl", torch.device("cpu"))
    assert resolve_backend("auto", torch.device("cpu")) == "gloo"


@unit
def test_world_from_torchrun_environment():
    assert world_from_env({}) == World()
    assert world_from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == World(1, 2, 1)
    with pytest.raises(InputError, match="malformed"):
        world_from_env({"RANK": "one", "WORLD_SIZE": "2"})


def _one_line_error(capsys, argv: list[str]) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("deepshrink: error:"), err
    return err


@unit
def test_cli_launch_errors_are_one_line(capsys, monkeypatch, tmp_path):
    assert "unknown device 'tpu'" in _one_line_error(capsys, ["train", "lenet300", "--device", "tpu", "--epochs", "1"])
    if NO_CUDA:
        assert "sees no CUDA GPU" in _one_line_error(
            capsys, ["prune", "lenet300", "--method", "magnitude", "--sparsity", "0.5", "--device", "cuda"]
        )
        # NCCL without a GPU under torchrun: refused before the process group is joined
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("WORLD_SIZE", "2")
        out = str(tmp_path / "x")
        assert "nccl needs CUDA GPUs" in _one_line_error(
            capsys, ["compress", "lenet5", "--recipe", "baseline", "--out", out, "--dist-backend", "nccl"]
        )
        assert "explicit --out" in _one_line_error(capsys, ["compress", "lenet5", "--recipe", "baseline"])
        assert not Path(out).exists()


@unit
def test_ray_launch_errors_are_one_line(capsys, monkeypatch, tmp_path):
    out = tmp_path / "study"
    argv = ["study", "--models", "lenet5", "--methods", "original fp32", "--out", str(out), "--executor", "ray"]
    assert "no Ray cluster answers at 127.0.0.1:9" in _one_line_error(capsys, [*argv, "--address", "127.0.0.1:9"])
    assert "expected HOST:PORT" in _one_line_error(capsys, [*argv, "--address", "nowhere"])
    assert "--address names a Ray cluster" in _one_line_error(capsys, [*argv[:-2], "--address", "127.0.0.1:9"])
    monkeypatch.setitem(sys.modules, "ray", None)  # Ray not installed
    assert "pip install 'deepshrink[distributed]'" in _one_line_error(capsys, argv)
    assert not out.exists()  # nothing half-made


# -- one process: bf16 autocast, a checkpoint that does not depend on the device ----------


@pytest.fixture(scope="module")
def small():
    return load_data(**DATA)


@unit
def test_bf16_autocast_trains_like_fp32_and_keeps_fp32_weights(small):
    top1 = {}
    for amp in ("none", "bf16"):
        torch.manual_seed(0)
        model = create_model("lenet300")
        config = TrainConfig(epochs=2, batch_size=64, lr=0.05, channels_last=False, device="cpu", amp=amp)
        top1[amp] = train(model, small.train, config, small.val, progress=False).history[-1]["val_top1"]
        assert all(p.dtype == torch.float32 for p in model.parameters())
    assert top1["bf16"] > 50.0  # 10 classes: chance is 10%
    assert abs(top1["bf16"] - top1["none"]) < 5.0, top1  # bf16's 8-bit mantissa: close, not equal


@unit
def test_checkpoint_resumes_across_devices(small, tmp_path):
    """``device`` says where a run trains, not what it computes: a checkpoint written with one
    device setting resumes under another; any other change is still refused."""
    path = tmp_path / "ck.pt"
    torch.manual_seed(0)
    train(create_model("lenet300"), small.train, DDP_CONFIG, checkpoint=path, progress=False)
    state = torch.load(path, weights_only=True)
    assert all(t.device.type == "cpu" for t in state["model"].values())
    trainer = Trainer(create_model("lenet300"), replace(DDP_CONFIG, device="auto"), small.train, checkpoint=path, progress=False)
    trainer.fit()
    assert trainer.epoch == 1 and trainer.step == state["step"]  # resumed, nothing retrained
    with pytest.raises(InputError, match="different training config"):
        Trainer(create_model("lenet300"), replace(DDP_CONFIG, lr=0.01), small.train, checkpoint=path, progress=False).fit()


# -- two gloo processes -----------------------------------------------------------------


class _StopAfterFirstEpoch(TrainHook):
    def on_epoch_end(self, trainer, metrics):
        if trainer.epoch == 2:
            raise KeyboardInterrupt  # after epoch 1's checkpoint, before epoch 2's


def _lenet5(seed: int = 0):
    torch.manual_seed(seed)
    return create_model("lenet5")


def _ddp_worker(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    world, out = World(rank, 2, rank), Path(out)
    data = load_data(**DATA)
    # 1. one data-parallel epoch (global batch 64 = 2 x 32)
    model = _lenet5()
    Trainer(model, DDP_CONFIG, data.train, progress=False, world=world).fit()
    torch.save(model.state_dict(), out / f"ddp{rank}.pt")
    # 2. resume: stop after epoch 1 of 2, start again from the checkpoint
    two = replace(DDP_CONFIG, epochs=2)
    ckpt = out / "resume.pt"
    with contextlib.suppress(KeyboardInterrupt):
        Trainer(_lenet5(), two, data.train, hooks=[_StopAfterFirstEpoch()], checkpoint=ckpt, progress=False, world=world).fit()
    resumed = _lenet5(1)  # different start: everything must come from the checkpoint
    Trainer(resumed, two, data.train, checkpoint=ckpt, progress=False, world=world).fit()
    straight = _lenet5()
    Trainer(straight, two, data.train, progress=False, world=world).fit()
    torch.save({"resumed": resumed.state_dict(), "straight": straight.state_dict()}, out / f"resume{rank}.pt")
    # 3. an AGP pruning + KD recipe through the runner, each rank into its own folder: masks must match
    from deepshrink.models import architecture_of
    from deepshrink.pipeline.recipe import load_recipe
    from deepshrink.pipeline.runner import run_recipe

    recipe = load_recipe(str(ROOT / "tests" / "data" / "agp_kd.yaml"))
    with launch("cpu"):
        run_recipe(create_model("lenet5", pretrained=True), recipe, data, out / f"run{rank}", architecture_of("lenet5"), progress=False)
    # 4. the checksum sees a difference on one rank, and a broadcast repairs it
    differing = [torch.arange(4.0) + (rank == 1)]
    agreed = ranks_agree(differing, torch.device("cpu"))
    broadcast_(differing)
    torch.save({"before": agreed, "after": ranks_agree(differing, torch.device("cpu"))}, out / f"agree{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    torch.multiprocessing.start_processes(_ddp_worker, args=(str(out / "store"), str(out)), nprocs=2, start_method="spawn")
    return out


@flow
def test_one_ddp_epoch_equals_one_process_epoch_with_the_same_global_batch(ddp_run, small):
    """Two gloo ranks vs one process that reads the same sampler order with the whole global batch."""
    single = _lenet5()
    sampler = DistributedSampler(small.train, num_replicas=1, rank=0, shuffle=True, seed=DDP_CONFIG.seed)
    Trainer(single, DDP_CONFIG, small.train, progress=False, sampler=sampler, world=World()).fit()
    ranks = [torch.load(ddp_run / f"ddp{r}.pt", weights_only=True) for r in (0, 1)]
    start = _lenet5().state_dict()
    for name, value in single.state_dict().items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name  # replicas are bit-identical
        assert torch.allclose(ranks[0][name], value, atol=DDP_ATOL, rtol=DDP_RTOL), (name, (ranks[0][name] - value).abs().max())
        assert not torch.allclose(start[name], value, atol=1e-3), name  # the epoch did move every tensor


@flow
def test_resume_under_two_processes_ends_where_an_uninterrupted_run_does(ddp_run):
    for rank in (0, 1):
        state = torch.load(ddp_run / f"resume{rank}.pt", weights_only=True)
        for name, value in state["straight"].items():
            assert torch.equal(state["resumed"][name], value), (rank, name)


@flow
def test_agp_kd_masks_are_identical_on_both_ranks(ddp_run):
    for step in ("step1_prune", "step2_distill"):
        a, b = (load_file(ddp_run / f"run{r}" / f"{step}.safetensors") for r in (0, 1))
        weights = [k for k in a if k.endswith("weight") and a[k].dim() > 1]
        assert sum(int((a[k] == 0).sum()) for k in weights) > 0.7 * sum(a[k].numel() for k in weights)  # pruned
        for k in weights:
            assert torch.equal(a[k] == 0, b[k] == 0), (step, k)


@flow
def test_checksum_detects_a_difference_and_broadcast_repairs_it(ddp_run):
    for rank in (0, 1):
        assert torch.load(ddp_run / f"agree{rank}.pt", weights_only=True) == {"before": False, "after": True}
    assert not torch.equal(
        checksum([torch.tensor([1.0, 2.0])], torch.device("cpu")), checksum([torch.tensor([2.0, 1.0])], torch.device("cpu"))
    )


# -- torchrun, end to end ---------------------------------------------------------------


def _torchrun(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess:
    scratch = tmp_path / "tmp"
    scratch.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TMPDIR": str(scratch)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "deepshrink", *argv]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert not [p for p in scratch.iterdir() if p.name.startswith("deepshrink-rank")]  # the other rank's scratch is gone
    return done


DATA_ARGS = ("--train-subset", "512", "--test-subset", "256", "--val-size", "256", "--no-progress")


@flow
@pytest.mark.parametrize(
    ("recipe", "files"),
    [
        ("agp_kd.yaml", {"step1_prune.safetensors", "step2_distill.safetensors", "model.dsz", "dsz_streams.json"}),
        ("qat4.yaml", {"step1_qat.safetensors", "model.qpack.safetensors"}),
    ],
)
def test_recipe_under_torchrun_writes_one_set_of_files(tmp_path, recipe, files):
    done = _torchrun(tmp_path, "compress", "lenet5", "--recipe", str(ROOT / "tests" / "data" / recipe), "--out", "run", *DATA_ARGS)
    assert done.stdout.count("report: run/report.md") == 1  # one rank reports
    written = {p.name for p in (tmp_path / "run").iterdir()}
    assert written == files | {"recipe.yaml", "report.json", "report.md", "report.html", "model.onnx"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "tmp"]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["onnx_top1"] > 80.0  # lenet5 from ~91%: one epoch on 512 images keeps it useful


# -- the study on Ray -------------------------------------------------------------------


@flow
def test_two_cell_study_on_local_ray_matches_the_process_pool(tmp_path):
    pytest.importorskip("ray")
    from deepshrink.pipeline.study import BUDGETS, run_study

    methods = {"original fp32": "baseline", "int8 PTQ": "int8-ptq"}
    rows = {}
    for executor in ("process", "ray"):
        result = run_study(tmp_path / executor, ("lenet5",), methods, BUDGETS["quick"], threads=1, progress=False, executor=executor)
        rows[executor] = {r["method"]: r for r in result.rows}
        lines = (tmp_path / executor / "cells.jsonl").read_text().splitlines()
        assert len(lines) == 2 and all(json.loads(line)["status"] == "ok" for line in lines)
    for key in ("top1", "top1_ort", "bytes"):
        assert rows["ray"]["int8 PTQ"][key] == rows["process"]["int8 PTQ"][key], key
    assert rows["ray"]["int8 PTQ"]["top1"] > 85.0
