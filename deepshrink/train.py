"""The one training / fine-tuning loop. Compression methods never write their
own loop: they plug into this one through hooks (extra loss terms such as
distillation or sparsity regularisers, after-step callbacks such as mask
re-application or gradual pruning, per-epoch callbacks).

What it trains on comes from outside: a batch source (labelled images by
default; token batches for transformers) and a loss function. So do its device
and its world (``deepshrink.distributed``): under ``torchrun`` it trains
data-parallel (DistributedDataParallel over a ``DistributedSampler``; the batch
size is the global batch), writes checkpoints and progress from rank 0 only,
and keeps what hooks hold (pruning masks) identical on every rank: broadcast
from rank 0 whenever a hook changes it, then checked with a checksum all-reduce.

Deterministic for a seed: shuffling and augmentation draw from one generator
whose state is checkpointed at every epoch end, so a run interrupted and
resumed ends with the same weights as an uninterrupted one.
"""

import contextlib
import functools
import io
import time
from collections.abc import Callable, Iterator, Sized
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
import torch.distributed as dist
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn
from torch.utils.data import DistributedSampler, Sampler

from deepshrink.core.errors import InputError
from deepshrink.core.files import write_atomic
from deepshrink.data.datasets import ImageSet, augment_batch, iterate_batches
from deepshrink.distributed import (
    SINGLE_PROCESS,
    Placement,
    World,
    barrier,
    broadcast_,
    check_device_name,
    check_ranks_agree,
    current_placement,
    resolve_device,
)
from deepshrink.evaluate.accuracy import evaluate_accuracy

# Fields that say where a run trains, not what it computes: a checkpoint resumes across them.
PLACEMENT_FIELDS = ("device",)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128  # the global batch: under torchrun each of N ranks takes batch_size / N
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: Literal["onecycle", "cosine", "constant"] = "onecycle"
    label_smoothing: float = 0.0
    # Largest gradient norm per step (None: no clipping). Freshly pruned BN-free nets (lenet5)
    # take first KD steps with norms of 45-135 and die at lr 0.02; resnet20/vgg peak near 16.
    grad_clip: float | None = None
    augment: bool = False
    seed: int = 0
    threads: int | None = None
    channels_last: bool = True  # 1.4-2.5x faster convolutions on CPU
    device: str = "auto"  # auto (CUDA when torch sees one) | cpu | cuda | cuda:N; the CLI's --device overrides it
    amp: Literal["none", "bf16"] = "none"  # bf16 autocast of the forward pass and the loss; weights stay fp32

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise InputError(f"epochs and batch_size must be >= 1, got {self.epochs} and {self.batch_size}")
        if not self.lr > 0:
            raise InputError(f"lr must be positive, got {self.lr}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise InputError(f"grad_clip must be positive, got {self.grad_clip}")
        if not 0 <= self.label_smoothing < 1:
            raise InputError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        check_device_name(self.device)


class TrainHook:
    """Override what you need. Hooks run in the order given to the Trainer."""

    def extra_loss(self, trainer: "Trainer", inputs: torch.Tensor, targets: torch.Tensor, logits: torch.Tensor) -> torch.Tensor | None:
        return None

    def after_step(self, trainer: "Trainer") -> None:
        pass

    def on_epoch_end(self, trainer: "Trainer", metrics: dict[str, float]) -> None:
        pass

    def rank_state(self) -> dict[str, torch.Tensor]:
        """Tensors that must be identical on every data-parallel rank (masks). When a step
        replaces this dict, the Trainer broadcasts rank 0's values and checks them."""
        return {}

    def rank_state_loaded(self) -> None:
        """Called after the Trainer overwrote ``rank_state()`` with rank 0's values."""

    def to(self, device: torch.device) -> "TrainHook":
        """Move the modules and tensors this hook holds (a teacher, masks, saved weights) to ``device``."""
        for name, value in list(vars(self).items()):
            moved = _move(value, device)
            if moved is not value:
                setattr(self, name, moved)
        return self


def _move(value: Any, device: torch.device) -> Any:
    if isinstance(value, nn.Module):
        return value.to(device)
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict) and value and all(isinstance(v, torch.Tensor) for v in value.values()):
        value.update({k: v.to(device) for k, v in value.items()})  # in place: forward hooks may hold this dict
    return value


def to_device(batch: Any, device: torch.device) -> Any:
    """A batch (tensors in tuples, lists or dicts) on ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


# -- what the loop trains on ------------------------------------------------------------


class BatchSource(Sized, Protocol):
    """One rank's batches: ``len`` of them per epoch, drawn with the trainer's generator."""

    def epoch(self, epoch: int, generator: torch.Generator) -> Iterator[Any]: ...


@dataclass
class StepOutput:
    """A loss function's answer for one batch; ``logits``/``targets`` feed the hooks and Top-1."""

    loss: torch.Tensor
    samples: int
    inputs: Any = None
    targets: torch.Tensor | None = None
    logits: torch.Tensor | None = None


LossFn = Callable[[nn.Module, Any, TrainConfig], StepOutput]


def classification_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], config: TrainConfig) -> StepOutput:
    """Cross-entropy (with the config's label smoothing) of labelled image batches."""
    x, y = batch
    if config.channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    logits = model(x)
    loss = nn.functional.cross_entropy(logits, y, label_smoothing=config.label_smoothing)
    return StepOutput(loss, len(y), x, y, logits)


class ImageBatches:
    """Labelled image batches. Without a sampler: the whole set, shuffled by the trainer's
    generator (one process). With one (a ``DistributedSampler`` under torchrun): this rank's
    share of each epoch, in batches of ``batch_size / world size``."""

    def __init__(self, data: ImageSet, config: TrainConfig, sampler: Sampler | None = None, world: World = SINGLE_PROCESS) -> None:
        if config.batch_size % world.size:
            raise InputError(f"batch_size {config.batch_size} is the global batch: it must divide by the {world.size} processes")
        self.data, self.config, self.sampler = data, config, sampler
        self.batch_size = config.batch_size // world.size

    def __len__(self) -> int:
        n = len(self.sampler) if self.sampler is not None else len(self.data)
        return -(-n // self.batch_size)

    def epoch(self, epoch: int, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        c = self.config
        if self.sampler is None:
            yield from iterate_batches(self.data, c.batch_size, shuffle=True, generator=generator, augment=c.augment)
            return
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
        order = torch.as_tensor(list(self.sampler), dtype=torch.long)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            x = self.data.images[idx]
            yield (augment_batch(x, generator) if c.augment else x), self.data.labels[idx]


def distributed_sampler(data: Sized, config: TrainConfig, world: World) -> DistributedSampler:
    """Each rank's share of a seeded permutation: rank r takes positions r, r+N, ... so the
    ranks' k-th local batches together are the k-th global batch of one process's order."""
    return DistributedSampler(data, num_replicas=world.size, rank=world.rank, shuffle=True, seed=config.seed)


@dataclass
class TrainResult:
    history: list[dict[str, float]] = field(default_factory=list)
    wall_time_s: float = 0.0


class Trainer:
    """Trains ``model`` in place on ``train_data`` (an ImageSet, or any BatchSource with a
    matching ``loss``). ``device``/``world`` default to the ambient placement (the CLI's
    ``--device`` and torchrun); ``sampler`` defaults to a DistributedSampler under torchrun.
    ``train_mode=False`` keeps the model in eval mode (no dropout) while it trains."""

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        train_data: ImageSet | BatchSource,
        val_data: ImageSet | None = None,
        hooks: list[TrainHook] | None = None,
        checkpoint: str | Path | None = None,
        progress: bool = True,
        *,
        loss: LossFn = classification_loss,
        sampler: Sampler | None = None,
        device: str | torch.device | None = None,
        world: World | None = None,
        train_mode: bool = True,
    ) -> None:
        self.model, self.config = model, config
        self.train_data, self.val_data = train_data, val_data
        self.hooks = hooks or []
        self.loss = loss
        self.train_mode = train_mode
        self.world, self.device = self._placement(device, world)
        if isinstance(train_data, ImageSet):
            if sampler is None and self.world.distributed:
                sampler = distributed_sampler(train_data, config, self.world)
            train_data = ImageBatches(train_data, config, sampler, self.world)
        self.batches: BatchSource = train_data
        self.checkpoint = Path(checkpoint) if checkpoint else None
        self.progress = progress and self.world.is_main
        self.epoch = 0  # epochs finished
        self.step = 0
        self.last_loss = float("nan")  # the latest step's loss (hooks may record it)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.optimizer = self._make_optimizer()
        self.scheduler = self._make_scheduler()
        self.result = TrainResult()
        self._started = time.perf_counter()  # reset by fit(); checkpoints add the time since
        self._synced: dict[int, int] = {}  # hook index -> id of the rank_state dict last broadcast

    def _placement(self, device: str | torch.device | None, world: World | None) -> tuple[World, torch.device]:
        ambient: Placement = current_placement()
        world = world or ambient.world
        if isinstance(device, torch.device):
            return world, device
        if device is None and ambient.device is not None:
            return world, ambient.device
        return world, resolve_device(device or self.config.device, world)

    def _make_optimizer(self) -> torch.optim.Optimizer:
        c = self.config
        params = [p for p in self.model.parameters() if p.requires_grad]
        if c.optimizer == "adam":
            return torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)
        return torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay, nesterov=c.momentum > 0)

    def _make_scheduler(self) -> torch.optim.lr_scheduler.LRScheduler:
        c = self.config
        steps = c.epochs * len(self.batches)
        if c.schedule == "onecycle":
            return torch.optim.lr_scheduler.OneCycleLR(self.optimizer, max_lr=c.lr, total_steps=steps, pct_start=0.15)
        if c.schedule == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=steps)
        return torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda _: 1.0)

    # -- checkpointing -------------------------------------------------------
    # One dict of named entries: later versions add keys (RNG streams, ...) without breaking older files.
    def _state(self) -> dict:
        return {
            "model": {k: v.cpu() for k, v in self.model.state_dict().items()},  # a CUDA run resumes on the CPU too
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "history": [list(h.items()) for h in self.result.history],
            "wall_time_s": self.result.wall_time_s + time.perf_counter() - self._started,
            "config": asdict(self.config),
            "world_size": self.world.size,
        }

    def save_checkpoint(self) -> None:
        """Rank 0 writes; the others wait for the file, so a resume on any rank finds the same one."""
        if self.checkpoint is None:
            return
        if self.world.is_main:
            buffer = io.BytesIO()
            torch.save(self._state(), buffer)
            write_atomic(self.checkpoint, buffer.getvalue())  # a crash never leaves half a checkpoint
        if self.world.distributed:
            barrier()

    def _resume(self) -> None:
        if self.checkpoint is None or not self.checkpoint.exists():
            return
        state = torch.load(self.checkpoint, weights_only=True, map_location="cpu")
        if _computation(state["config"]) != _computation(asdict(self.config)):
            raise InputError(f"{self.checkpoint}: checkpoint was written with a different training config; delete it to start over")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.step = state["epoch"], state["step"]
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.result.history = [dict(h) for h in state["history"]]
        self.result.wall_time_s = state.get("wall_time_s", 0.0)  # training time survives interruptions

    # -- the loop ------------------------------------------------------------
    def fit(self) -> TrainResult:
        """Train on the device, then hand the model (and hooks) back on the device they came from."""
        home = _device_of(self.model)
        self._place(self.device)
        try:
            return self._fit()
        finally:
            self._place(home)

    def _place(self, device: torch.device) -> None:
        self.model.to(device)
        for hook in self.hooks:
            hook.to(device)

    def _fit(self) -> TrainResult:
        c = self.config
        if c.threads:
            torch.set_num_threads(c.threads)
        torch.manual_seed(c.seed)
        self._resume()
        if c.channels_last:
            self.model.to(memory_format=torch.channels_last)
        net = self._data_parallel()
        self._started = start = time.perf_counter()
        with Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}/{task.fields[epochs]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.3f}"),
            TimeRemainingColumn(),
            disable=not self.progress,
            transient=True,
        ) as bar:
            while self.epoch < c.epochs:
                task = bar.add_task("train", total=len(self.batches), epoch=self.epoch + 1, epochs=c.epochs, loss=float("nan"))
                metrics = self._train_epoch(net, functools.partial(_advance, bar, task))
                bar.remove_task(task)
                self.epoch += 1
                self._check_replicas()
                if self.val_data is not None and len(self.val_data):
                    val = evaluate_accuracy(self.model, self.val_data)
                    metrics.update(val_top1=val.top1, val_loss=val.loss)
                metrics = {"epoch": self.epoch, **metrics}
                self.result.history.append(metrics)
                for hook in self.hooks:
                    hook.on_epoch_end(self, metrics)
                if self.progress:
                    bar.console.print(" ".join(f"{k}={v:.4g}" for k, v in metrics.items()), soft_wrap=True)
                self.save_checkpoint()
        self.model.to(memory_format=torch.contiguous_format)
        self.model.eval()
        self.result.wall_time_s += time.perf_counter() - start
        return self.result

    def _data_parallel(self) -> nn.Module:
        """The module to call: under torchrun a DDP wrapper, whose construction broadcasts rank 0's
        weights and buffers (calibrated quantizer ranges included) to every rank."""
        if not self.world.distributed:
            return self.model
        ids = [self.device.index] if self.device.type == "cuda" else None
        # forward_sync_buffers: rank 0's buffers (BN statistics, EMA ranges) before every forward.
        return nn.parallel.DistributedDataParallel(self.model, device_ids=ids, forward_sync_buffers=True)

    def _autocast(self):
        if self.config.amp == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _train_epoch(self, net: nn.Module, advance) -> dict[str, float]:
        c = self.config
        net.train(self.train_mode)
        totals = torch.zeros(4, dtype=torch.float64)  # loss x samples, samples, correct, labelled samples
        for batch in self.batches.epoch(self.epoch, self.generator):
            with self._autocast():
                out = self.loss(net, to_device(batch, self.device), c)
                loss = out.loss
                for hook in self.hooks:
                    extra = hook.extra_loss(self, out.inputs, out.targets, out.logits)
                    if extra is not None:
                        loss = loss + extra
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if c.grad_clip is not None:
                nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1
            self.last_loss = loss.item()
            for hook in self.hooks:
                hook.after_step(self)
            self._sync_hook_state()
            totals += _step_totals(out, self.last_loss)
            advance(self.last_loss)
        totals = self._sum_over_ranks(totals)
        metrics = {"train_loss": float(totals[0] / totals[1])}
        if totals[3]:
            metrics["train_top1"] = float(100.0 * totals[2] / totals[3])
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        return metrics

    # -- data-parallel consistency --------------------------------------------------------
    def _sum_over_ranks(self, totals: torch.Tensor) -> torch.Tensor:
        """Epoch metrics over the global batch, the same on every rank."""
        if not self.world.distributed:
            return totals
        on_device = totals.to(self.device)
        dist.all_reduce(on_device)
        return on_device.cpu()

    def _sync_hook_state(self) -> None:
        """After a hook replaced its rank state (a pruning step's new masks): rank 0's wins, then checked."""
        if not self.world.distributed:
            return
        for i, hook in enumerate(self.hooks):
            state = hook.rank_state()
            if not state or self._synced.get(i) == id(state):
                continue
            tensors = list(state.values())
            broadcast_(tensors)
            check_ranks_agree(f"{type(hook).__name__} state at step {self.step}", tensors, self.device)
            hook.rank_state_loaded()
            self._synced[i] = id(state)

    def _check_replicas(self) -> None:
        """At each epoch end: rank 0's buffers (BN statistics, EMA ranges) everywhere, then one
        checksum all-reduce over weights, buffers and hook state."""
        if not self.world.distributed:
            return
        buffers = list(self.model.buffers())
        broadcast_(buffers)
        hook_state = [t for hook in self.hooks for t in hook.rank_state().values()]
        check_ranks_agree(
            f"weights, buffers and masks after epoch {self.epoch}", [*self.model.parameters(), *buffers, *hook_state], self.device
        )


def _step_totals(out: StepOutput, loss: float) -> torch.Tensor:
    correct = labelled = 0
    if out.logits is not None and out.targets is not None:
        correct, labelled = int((out.logits.argmax(1) == out.targets).sum()), len(out.targets)
    return torch.tensor([loss * out.samples, out.samples, correct, labelled], dtype=torch.float64)


def _computation(config: dict) -> dict:
    """The config fields that change the numbers (not where they were computed); fields added
    since a checkpoint was written take their defaults."""
    defaults = asdict(TrainConfig())
    return {k: v for k, v in {**defaults, **config}.items() if k not in PLACEMENT_FIELDS}


def _device_of(model: nn.Module) -> torch.device:
    tensor = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _advance(bar: Progress, task, loss: float) -> None:
    bar.update(task, advance=1, loss=loss)


def train(model: nn.Module, train_data: ImageSet, config: TrainConfig, val_data: ImageSet | None = None, **kwargs) -> TrainResult:
    """Train ``model`` in place; see ``Trainer`` for hooks, checkpointing, devices and progress."""
    return Trainer(model, config, train_data, val_data, **kwargs).fit()
