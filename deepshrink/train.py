"""The one training / fine-tuning loop. Compression methods never write their
own loop: they plug into this one through hooks (extra loss terms such as
distillation or sparsity regularisers, after-step callbacks such as mask
re-application or gradual pruning, per-epoch callbacks).

Deterministic for a seed: shuffling and augmentation draw from one generator
whose state is checkpointed at every epoch end, so a run interrupted and
resumed ends with the same weights as an uninterrupted one.
"""

import functools
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from deepshrink.core.errors import InputError
from deepshrink.data.datasets import ImageSet, iterate_batches
from deepshrink.evaluate.accuracy import evaluate_accuracy


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
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

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise InputError(f"epochs and batch_size must be >= 1, got {self.epochs} and {self.batch_size}")
        if not self.lr > 0:
            raise InputError(f"lr must be positive, got {self.lr}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise InputError(f"grad_clip must be positive, got {self.grad_clip}")
        if not 0 <= self.label_smoothing < 1:
            raise InputError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")


class TrainHook:
    """Override what you need. Hooks run in the order given to the Trainer."""

    def extra_loss(self, trainer: "Trainer", inputs: torch.Tensor, targets: torch.Tensor, logits: torch.Tensor) -> torch.Tensor | None:
        return None

    def after_step(self, trainer: "Trainer") -> None:
        pass

    def on_epoch_end(self, trainer: "Trainer", metrics: dict[str, float]) -> None:
        pass


@dataclass
class TrainResult:
    history: list[dict[str, float]] = field(default_factory=list)
    wall_time_s: float = 0.0


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        train_data: ImageSet,
        val_data: ImageSet | None = None,
        hooks: list[TrainHook] | None = None,
        checkpoint: str | Path | None = None,
        progress: bool = True,
    ) -> None:
        self.model, self.config = model, config
        self.train_data, self.val_data = train_data, val_data
        self.hooks = hooks or []
        self.checkpoint = Path(checkpoint) if checkpoint else None
        self.progress = progress
        self.epoch = 0  # epochs finished
        self.step = 0
        self.generator = torch.Generator().manual_seed(config.seed)
        self.optimizer = self._make_optimizer()
        self.scheduler = self._make_scheduler()
        self.result = TrainResult()
        self._started = time.perf_counter()  # reset by fit(); checkpoints add the time since

    def _make_optimizer(self) -> torch.optim.Optimizer:
        c = self.config
        params = [p for p in self.model.parameters() if p.requires_grad]
        if c.optimizer == "adam":
            return torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)
        return torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay, nesterov=c.momentum > 0)

    def _make_scheduler(self) -> torch.optim.lr_scheduler.LRScheduler:
        c = self.config
        steps = c.epochs * -(-len(self.train_data) // c.batch_size)
        if c.schedule == "onecycle":
            return torch.optim.lr_scheduler.OneCycleLR(self.optimizer, max_lr=c.lr, total_steps=steps, pct_start=0.15)
        if c.schedule == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=steps)
        return torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda _: 1.0)

    # -- checkpointing -------------------------------------------------------
    def _state(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "history": [list(h.items()) for h in self.result.history],
            "wall_time_s": self.result.wall_time_s + time.perf_counter() - self._started,
            "config": asdict(self.config),
        }

    def save_checkpoint(self) -> None:
        if self.checkpoint is None:
            return
        self.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.checkpoint.with_name(self.checkpoint.name + ".tmp")
        torch.save(self._state(), tmp)
        os.replace(tmp, self.checkpoint)  # atomic: an interrupt never leaves half a checkpoint

    def _resume(self) -> None:
        if self.checkpoint is None or not self.checkpoint.exists():
            return
        state = torch.load(self.checkpoint, weights_only=True)
        if state["config"] != asdict(self.config):
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
        c = self.config
        if c.threads:
            torch.set_num_threads(c.threads)
        torch.manual_seed(c.seed)
        self._resume()
        if c.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self._started = start = time.perf_counter()
        batches = -(-len(self.train_data) // c.batch_size)
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
                task = bar.add_task("train", total=batches, epoch=self.epoch + 1, epochs=c.epochs, loss=float("nan"))
                metrics = self._train_epoch(functools.partial(_advance, bar, task))
                bar.remove_task(task)
                self.epoch += 1
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

    def _train_epoch(self, advance) -> dict[str, float]:
        c = self.config
        self.model.train()
        total, seen, correct = 0.0, 0, 0
        for x, y in iterate_batches(self.train_data, c.batch_size, shuffle=True, generator=self.generator, augment=c.augment):
            if c.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            logits = self.model(x)
            loss = nn.functional.cross_entropy(logits, y, label_smoothing=c.label_smoothing)
            for hook in self.hooks:
                extra = hook.extra_loss(self, x, y, logits)
                if extra is not None:
                    loss = loss + extra
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if c.grad_clip is not None:
                nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            self.step += 1
            for hook in self.hooks:
                hook.after_step(self)
            total += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
            advance(loss.item())
        return {"train_loss": total / seen, "train_top1": 100.0 * correct / seen, "lr": self.scheduler.get_last_lr()[0]}


def _advance(bar: Progress, task, loss: float) -> None:
    bar.update(task, advance=1, loss=loss)


def train(model: nn.Module, train_data: ImageSet, config: TrainConfig, val_data: ImageSet | None = None, **kwargs) -> TrainResult:
    """Train ``model`` in place; see ``Trainer`` for hooks, checkpointing and progress."""
    return Trainer(model, config, train_data, val_data, **kwargs).fit()
