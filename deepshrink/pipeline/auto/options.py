"""The search's knobs (``AutoOptions``), one layer's setting (``Option``), a trial and the result."""

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

from deepshrink.core.config import Scope
from deepshrink.core.errors import InputError
from deepshrink.train import TrainConfig

PRUNE_LEVELS: tuple[float, ...] = (0.3, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97)  # per-layer choices
PROBED_LEVELS: tuple[float, ...] = (0.5, 0.7, 0.85, 0.93, 0.97)  # measured; the others interpolated (halves the probes)
BIT_LEVELS: tuple[int, ...] = (2, 3, 4, 5, 6)  # 6 bits is already near lossless (.dsz codebooks allow up to 8)
AGP_FRACTION = 0.7  # sparsity ramps over the first 70% of a trial's fine-tuning, then holds
FP32_BITS = 32  # a layer left unshared
LATENCY_HEADROOM = 0.95  # channels are chosen to run 5% under the target: timings on a busy CPU wander


@dataclass(frozen=True)
class AutoOptions:
    """Search knobs; the defaults keep resnet20 on 20k images well under 40 minutes on 2 cores."""

    epochs: int = 2  # pruning fine-tune epochs per trial (accumulate: a trial continues the last good one)
    share_epochs: int = 1  # codebook fine-tune epochs per trial
    lr: float = 0.01
    share_lr: float = 0.001  # Adam: a centroid's gradient sums over all its weights, which SGD at a fixed lr overshoots
    batch_size: int = 128
    max_trials: int = 4
    sensitivity_samples: int = 512
    prune_levels: tuple[float, ...] = PRUNE_LEVELS
    probed_levels: tuple[float, ...] = PROBED_LEVELS
    bit_levels: tuple[int, ...] = BIT_LEVELS
    gate: Literal["val", "test"] = "val"  # where the max_drop bound is checked during the search
    scope: Scope = Scope()
    latency_batch: int = 1
    latency_repeats: int = 30
    channel_ratios: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    round_to: int = 8  # ORT's conv kernels work in blocks of 8 channels
    threads: int | None = None
    seed: int = 0
    distill: bool = True  # fine-tune against the original model's soft outputs as well as the labels

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.share_epochs < 1:
            raise InputError(f"epochs and share_epochs must be >= 1, got {self.epochs} and {self.share_epochs}")
        if self.max_trials < 1:
            raise InputError(f"max_trials must be >= 1, got {self.max_trials}")
        if self.sensitivity_samples < 1:
            raise InputError(f"sensitivity_samples must be >= 1, got {self.sensitivity_samples}")
        for key in ("prune_levels", "probed_levels"):
            if not getattr(self, key) or not all(0 < s < 1 for s in getattr(self, key)):
                raise InputError(f"{key} must be in (0, 1), got {getattr(self, key)}")
        if not all(1 <= b <= 8 for b in self.bit_levels) or not self.bit_levels:
            raise InputError(f"bit_levels must be in [1, 8] (a .dsz codebook holds at most 256 values), got {self.bit_levels}")
        if self.gate not in ("val", "test"):
            raise InputError(f"gate must be 'val' or 'test', got {self.gate!r}")

    def prune_train(self) -> TrainConfig:
        return TrainConfig(
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            weight_decay=0.0,
            schedule="cosine",
            threads=self.threads,
            seed=self.seed,
        )

    def share_train(self) -> TrainConfig:
        return replace(self.prune_train(), epochs=self.share_epochs, lr=self.share_lr, optimizer="adam")


@dataclass(frozen=True)
class Option:
    """One layer's setting with its cost (output KL divergence, scaled by the trials) and coded bytes."""

    sparsity: float
    bits: int
    bytes: int
    cost: float


Plan = dict[str, Option]


@dataclass
class Trial:
    number: int
    kind: str  # "channel" or "prune+share"
    start: str  # what the trial fine-tuned from
    budget: int | None = None  # bytes the plan was picked for
    est_bytes: int | None = None
    bytes: int | None = None
    planned_sparsity: float | None = None
    sparsity: float | None = None  # measured over the planned layers' weights
    mean_bits: float | None = None  # over the non-zero weights
    gate_top1_pruned: float | None = None
    gate_top1: float | None = None
    drop: float | None = None
    latency_ms: float | None = None
    feasible: bool = False
    note: str = ""
    seconds: float = 0.0
    plan: dict[str, dict] = field(default_factory=dict)
    weights: tuple[float, float] = (1.0, 1.0)  # (pruning, sharing) cost scales the plan was picked with


@dataclass
class AutoResult:
    """What the search chose and measured. Top-1 in percent; ``gate`` is the set ``max_drop`` was checked on."""

    max_drop: float
    gate: str
    baseline_top1: float  # test set
    baseline_gate_top1: float
    fp32_bytes: int
    target_bytes: int | None = None
    target_latency_ms: float | None = None
    plan: dict[str, dict] = field(default_factory=dict)  # {layer: {"sparsity": float, "bits": int}}; bits 32: unshared
    trials: list[Trial] = field(default_factory=list)
    met: bool = False
    reason: str = ""
    top1: float | None = None  # test Top-1 of the model decoded from model.dsz
    gate_top1: float | None = None
    bytes: int | None = None  # model.dsz on disk
    baseline_latency_ms: float | None = None
    latency_ms: float | None = None
    channel_ratio: float = 0.0
    paths: dict[str, Path] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def drop(self) -> float | None:
        return None if self.top1 is None else self.baseline_top1 - self.top1

    @property
    def ratio(self) -> float | None:
        return self.fp32_bytes / self.bytes if self.bytes else None

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(drop=self.drop, ratio=self.ratio, paths={k: str(v) for k, v in self.paths.items()})
        return out
