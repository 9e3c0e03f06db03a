"""Where training runs: the device, and the process group when launched by ``torchrun``.

The training loop takes its device and its world (rank, size) from outside. The
CLI resolves them once per command with ``launch(...)``, which sets the ambient
``Placement`` that every ``Trainer`` of that command reads when it is not given
one explicitly, so the compression methods never thread a device through.

Under ``torchrun`` (RANK / WORLD_SIZE / LOCAL_RANK in the environment) ``launch``
joins the process group: gloo on CPU, NCCL on CUDA (one GPU per rank, cuda:LOCAL_RANK).
"""

import contextlib
import contextvars
import datetime
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from deepshrink.core.errors import DeepShrinkError, InputError

DEVICE_NAMES = "auto, cpu, cuda or cuda:N"
BACKENDS = ("auto", "gloo", "nccl")
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


class RankMismatch(DeepShrinkError):
    """Replicas that must be identical on every rank (weights, masks, quantizer state) differ."""


@dataclass(frozen=True)
class World:
    """This process's place among the data-parallel processes; one process: rank 0 of 1."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes files, progress and reports."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


@dataclass(frozen=True)
class Placement:
    """The device (None: each TrainConfig's own ``device``) and the world a Trainer runs in."""

    device: torch.device | None = None
    world: World = World()


SINGLE_PROCESS = World()
_PLACEMENT: contextvars.ContextVar[Placement | None] = contextvars.ContextVar("deepshrink_placement", default=None)


def check_device_name(name: str) -> None:
    if not isinstance(name, str) or not _DEVICE.fullmatch(name):
        raise InputError(f"unknown device {name!r}; use {DEVICE_NAMES}")


def resolve_device(name: str, world: World = SINGLE_PROCESS) -> torch.device:
    """``auto`` is CUDA when torch sees a GPU, else the CPU; under torchrun ``cuda`` is cuda:LOCAL_RANK."""
    check_device_name(name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise InputError(f"device {name!r} asked for, but torch {torch.__version__} ({build}) sees no CUDA GPU; use --device cpu")
    if ":" in name and world.distributed:
        raise InputError(f"device {name!r} pins every rank to one GPU; under torchrun use --device cuda (rank r takes cuda:LOCAL_RANK)")
    index = int(name.partition(":")[2]) if ":" in name else world.local_rank
    if index >= torch.cuda.device_count():
        raise InputError(f"device cuda:{index} does not exist: torch sees {torch.cuda.device_count()} GPU(s)")
    return torch.device("cuda", index)


def world_from_env(env: dict[str, str] | None = None) -> World:
    """The world torchrun describes in the environment; one process when it does not."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" not in env:
        return World()
    try:
        return World(int(env.get("RANK", "0")), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")))
    except ValueError:
        raise InputError(f"torchrun environment is malformed: RANK={env.get('RANK')!r} WORLD_SIZE={env.get('WORLD_SIZE')!r}") from None


def resolve_backend(backend: str, device: torch.device) -> str:
    """gloo for CPU tensors, NCCL for CUDA ones; NCCL without a GPU is a one-line error."""
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}; use {', '.join(BACKENDS)}")
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and (device.type != "cuda" or not dist.is_nccl_available()):
        why = "torch has no NCCL" if not dist.is_nccl_available() else f"the device is {device}"
        raise InputError(f"backend nccl needs CUDA GPUs, but {why}; use --dist-backend gloo or --device cuda on a GPU machine")
    return backend


def current_placement() -> Placement:
    """The ambient placement; a process group started outside ``launch`` still counts as the world."""
    placement = _PLACEMENT.get() or Placement()
    if not placement.world.distributed and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return Placement(placement.device, World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))))
    return placement


@contextlib.contextmanager
def on_placement_device(model: "torch.nn.Module") -> Iterator[torch.device]:
    """Run a block with ``model`` on the ambient ``--device`` (where it already is when none was
    given), then put it back: calibration and evaluation follow the device flag, files never do."""
    home = next(model.parameters(), torch.empty(0)).device
    device = current_placement().device or home
    model.to(device)
    try:
        yield device
    finally:
        model.to(home)


@contextlib.contextmanager
def placed(placement: Placement) -> Iterator[Placement]:
    """Run a block with ``placement`` as every Trainer's default."""
    token = _PLACEMENT.set(placement)
    try:
        yield placement
    finally:
        _PLACEMENT.reset(token)


@contextlib.contextmanager
def launch(device: str | None = None, backend: str = "auto", timeout_s: float = 1800.0) -> Iterator[Placement]:
    """Resolve ``device`` (None: each TrainConfig's own) and, under torchrun, join the process
    group for the block; leaves it at the end. Errors are one line, before any work starts."""
    world = world_from_env()
    resolved = resolve_device(device, world) if device is not None else None
    if not world.distributed:
        with placed(Placement(resolved, world)) as placement:
            yield placement
        return
    train_device = resolved if resolved is not None else resolve_device("auto", world)
    name = resolve_backend(backend, train_device)
    if train_device.type == "cuda":
        torch.cuda.set_device(train_device)
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group(name, rank=world.rank, world_size=world.size, timeout=datetime.timedelta(seconds=timeout_s))
    try:
        with placed(Placement(resolved, world)) as placement:
            yield placement
    finally:
        if owned and dist.is_initialized():
            dist.destroy_process_group()


# -- keeping replicas identical ---------------------------------------------------------


def _position_weights(n: int, device: torch.device) -> torch.Tensor:
    return (torch.arange(n, device=device, dtype=torch.float64) % 1021) + 1.0


def checksum(tensors: Iterable[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Two float64 numbers per tensor: its sum and a position-weighted sum (a swap changes it)."""
    sums = []
    for t in tensors:
        flat = t.detach().reshape(-1).to(device=device, dtype=torch.float64)
        sums += [flat.sum(), (flat * _position_weights(flat.numel(), device)).sum()]
    return torch.stack(sums) if sums else torch.zeros(0, dtype=torch.float64, device=device)


def ranks_agree(tensors: list[torch.Tensor], device: torch.device) -> bool:
    """Whether every rank holds the same ``tensors`` (one all-reduce of 4 numbers per tensor)."""
    local = checksum(tensors, device)
    both = torch.cat([local, -local])
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    return bool(torch.equal(both[: len(local)], -both[len(local) :]))


def broadcast_(tensors: Iterable[torch.Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` in place with rank ``src``'s values (bool tensors travel as bytes)."""
    for t in tensors:
        dist.broadcast(t.view(torch.uint8) if t.dtype == torch.bool else t, src=src)


def check_ranks_agree(what: str, tensors: list[torch.Tensor], device: torch.device) -> None:
    if not ranks_agree(tensors, device):
        raise RankMismatch(f"{what} differ between ranks (checksum all-reduce); the data-parallel replicas diverged")


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# -- a command under torchrun -----------------------------------------------------------

OUTPUT_ARGS = ("out", "checkpoint")  # where a command writes (and resumes from)


def check_torchrun_command(args, world: World) -> None:
    """What cannot work data-parallel fails before any rank starts."""
    if not world.distributed:
        return
    if args.command == "study":
        raise InputError("study runs each cell in its own process; launch it without torchrun (for a cluster: --executor ray)")
    if getattr(args, "out", "") is None and args.command != "train":
        raise InputError(f"under torchrun give {args.command} an explicit --out: every rank must resume from the same folder")


@contextlib.contextmanager
def follower_sandbox(args, world: World) -> Iterator[None]:
    """Ranks other than 0 run the command in a scratch folder that starts as a copy of the
    outputs it resumes from (so every rank takes the same path through the command) and is
    deleted at the end; their output, progress and reports go nowhere. Rank 0 alone writes."""
    if world.is_main:
        yield
        return
    cwd, scratch = Path.cwd(), Path(tempfile.mkdtemp(prefix=f"deepshrink-rank{world.rank}-"))
    for name, value in vars(args).items():
        if not isinstance(value, str) or not value:
            continue
        if name in OUTPUT_ARGS:
            setattr(args, name, str(_mirror(cwd / value, scratch)))
        elif (os.sep in value or Path(value).suffix) and (cwd / value).exists():
            setattr(args, name, str((cwd / value).resolve()))  # inputs still resolve from the scratch folder
    for flag, quiet in (("no_progress", True), ("publish", False)):
        if hasattr(args, flag):
            setattr(args, flag, quiet)
    sys.path.insert(0, str(cwd))  # module:function models import from the launch folder
    try:
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            os.chdir(scratch)
            yield
    finally:
        os.chdir(cwd)
        shutil.rmtree(scratch, ignore_errors=True)


def _mirror(path: Path, scratch: Path) -> Path:
    """``path``'s place in the scratch folder, holding a copy of what is there now."""
    target = scratch / path.resolve().relative_to(path.resolve().anchor)
    target.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir():
        shutil.copytree(path, target)
    elif path.exists():
        shutil.copy2(path, target)
    return target


@contextlib.contextmanager
def command_context(args) -> Iterator[Placement]:
    """A CLI command's placement: ``--device``/``--dist-backend``, torchrun's process group, and
    the scratch folder of the ranks that do not write. All ranks start together."""
    world = world_from_env()
    check_torchrun_command(args, world)
    with launch(getattr(args, "device", None), getattr(args, "dist_backend", "auto")) as placement, follower_sandbox(args, placement.world):
        barrier()  # no rank starts writing before the others copied what they resume from
        yield placement
