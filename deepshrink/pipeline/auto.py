"""Accuracy-aware automatic compression: per-layer sparsity and k-means bits under a budget.

The search follows Deep Compression (prune -> k-means share -> entropy-coded
``.dsz``) but picks every layer's sparsity and codebook bits itself:

1. *Sensitivity*: each layer alone is pruned to a few sparsities and, separately,
   k-means shared at each candidate bit width; the cost is the KL divergence of
   the model's outputs from the original's on a validation subset (smooth and
   strictly positive, where a Top-1 count on a few hundred images is mostly 0).
2. *Bytes*: the model is packed once per (sparsity, bits) pair with every layer
   alike; each layer's coded streams plus its manifest entry give a per-layer
   byte table, the rest (biases, BN, header) a fixed overhead.
3. *Plan path*: per layer, the lower convex hull of (bytes, cost) from the
   cheapest option toward fewer bytes; merging all layers' moves by cost per byte
   saved orders plans from least to most aggressive (a Lagrangian sweep).
4. *Accuracy-aware loop* (as Intel Neural Compressor's tuning loop): a trial
   prunes to the plan with gradual (AGP) fine-tuning, shares with codebook
   fine-tuning, packs the ``.dsz`` and measures bytes on disk and Top-1 on the
   gate set. One-layer costs ignore recovery by fine-tuning, which differs a lot
   between pruning (all weights retrain) and sharing (only codebooks do), so each
   trial rescales the two by the damage it measured and the path is rebuilt.
   With a size target the least aggressive plan estimated to fit is tried; too
   big corrects the estimate, too inaccurate retries the re-weighted plan (the
   same plan again means longer fine-tuning). Without one, a geometric bisection
   of the byte budget finds the smallest plan within ``max_drop``. A trial
   continues from the last good pruned model, so fine-tuning accumulates. Every
   fine-tune distills from the original model (Hinton's soft targets, teacher
   logits computed once per image), which recovers more than labels alone.

A latency target adds a first stage: structured channel pruning (the knob that
makes dense ONNX Runtime kernels faster) at the smallest ratio that meets it.

Impossible budgets fail before any training with an ``InputError`` that says
what is reachable; a reachable budget the accuracy bound rules out gives
``AutoResult.met = False`` with the closest trial written out.
"""

import copy
import json
import math
import re
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from deepshrink.compress.distill.distill import finetune_with_kd
from deepshrink.compress.distill.hook import KD, TeacherCache
from deepshrink.compress.prune.masks import apply_masks, magnitude_masks
from deepshrink.compress.prune.schedules import GradualPruningHook
from deepshrink.compress.prune.structured import ChannelPrune
from deepshrink.compress.share.kmeans import kmeans_1d
from deepshrink.compress.share.kmeans_share import KMeansShare, tie_to_codebooks
from deepshrink.compress.share.shared import untie
from deepshrink.core.config import Scope
from deepshrink.core.errors import InputError
from deepshrink.core.methods import Context, apply_method
from deepshrink.data.datasets import DataBundle, ImageSet
from deepshrink.encode.container import read_archive
from deepshrink.encode.pack import pack, pack_verified
from deepshrink.evaluate.accuracy import evaluate_accuracy
from deepshrink.evaluate.environment import environment
from deepshrink.evaluate.latency import ort_latency
from deepshrink.evaluate.size import fp32_param_bytes
from deepshrink.export.onnx import export_onnx, onnx_bytes, ort_session, write_atomic
from deepshrink.report.tables import Column, markdown_table
from deepshrink.train import TrainConfig, TrainHook

PRUNE_LEVELS: tuple[float, ...] = (0.3, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97)  # per-layer choices
PROBED_LEVELS: tuple[float, ...] = (0.5, 0.7, 0.85, 0.93, 0.97)  # measured; the others interpolated (halves the probes)
BIT_LEVELS: tuple[int, ...] = (2, 3, 4, 5, 6)  # 6 bits is already near lossless (.dsz codebooks allow up to 8)
AGP_FRACTION = 0.7  # sparsity ramps over the first 70% of a trial's fine-tuning, then holds
SIZE_UNITS = {"b": 1, "kb": 1000, "kib": 1024, "mb": 1000**2, "mib": 1024**2, "gb": 1000**3, "gib": 1024**3}
TIME_UNITS = {"ms": 1.0, "us": 1e-3, "µs": 1e-3, "s": 1000.0}
FP32_BITS = 32  # a layer left unshared
LATENCY_HEADROOM = 0.95  # channels are chosen to run 5% under the target: timings on a busy CPU wander


# -- budgets ------------------------------------------------------------------------------
def _split_number(text: str, flag: str, example: str) -> tuple[float, str]:
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-zµ]*)\s*", str(text))
    if not match:
        raise InputError(f"{flag}: cannot read {text!r}; write a number with a unit, e.g. {example}")
    return float(match.group(1)), match.group(2).lower()


def parse_size(text: str | int, flag: str = "--target-size") -> int:
    """Bytes from ``200KB``, ``1.5MB``, ``150000`` (bytes). KB/MB are powers of 1000, KiB/MiB of 1024."""
    value, unit = _split_number(str(text), flag, "200KB (1000 bytes), 196KiB (1024) or 150000 (bytes)")
    if unit not in SIZE_UNITS and unit != "":
        raise InputError(f"{flag}: unknown unit {unit!r} in {text!r}; use B, KB, KiB, MB, MiB, GB or GiB")
    size = int(value * SIZE_UNITS.get(unit, 1))
    if size < 1:
        raise InputError(f"{flag}: the size must be at least one byte, got {text!r}")
    return size


def parse_latency(text: str | float, flag: str = "--target-latency") -> float:
    """Milliseconds from ``5ms``, ``800us``, ``0.01s`` or ``5`` (milliseconds)."""
    value, unit = _split_number(str(text), flag, "5ms, 800us or 0.01s")
    if unit not in TIME_UNITS and unit != "":
        raise InputError(f"{flag}: unknown unit {unit!r} in {text!r}; use ms, us or s")
    ms = value * TIME_UNITS.get(unit, 1.0)
    if not ms > 0:
        raise InputError(f"{flag}: the latency must be positive, got {text!r}")
    return ms


def check_max_drop(value: float, flag: str = "--max-drop") -> float:
    if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
        raise InputError(f"{flag}: the allowed Top-1 drop (percentage points) must be >= 0, got {value!r}")
    return float(value)


# -- options and results ---------------------------------------------------------------------
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


# -- sensitivity and byte tables ---------------------------------------------------------------
def layer_names(model: nn.Module, scope: Scope) -> list[str]:
    names = [name for name, _ in scope.layers(model)]
    if not names:
        raise InputError(f"no Conv2d/Linear layers in scope {scope}")
    return names


def _shared_weight(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """``weight`` with its non-zero values replaced by their nearest of 2^bits k-means centroids."""
    keep = weight != 0
    if not keep.any():
        return weight.clone()
    codebook, assignment = kmeans_1d(weight[keep], 2**bits)
    shared = torch.zeros_like(weight)
    shared[keep] = codebook[assignment]
    return shared


@torch.no_grad()
def output_logprobs(model: nn.Module, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    was_training = model.training
    model.eval()
    out = torch.cat([torch.log_softmax(model(images[i : i + batch_size]), 1) for i in range(0, len(images), batch_size)])
    model.train(was_training)
    return out


def kl_divergence(reference: torch.Tensor, logprobs: torch.Tensor) -> float:
    """Mean KL(reference || changed) of the predicted distributions: > 0 for any change, unlike a Top-1 count."""
    return float((reference.exp() * (reference - logprobs)).sum(1).mean())


@torch.no_grad()
def measure_sensitivity(
    model: nn.Module, images: torch.Tensor, names: list[str], options: AutoOptions, progress: bool = True
) -> dict[str, dict[str, dict]]:
    """{layer: {"prune": {sparsity: cost}, "bits": {bits: cost}}}, one layer changed at a time; the cost is the
    KL divergence of the model's outputs from the unchanged model's (smooth and additive for small changes)."""
    probe = copy.deepcopy(model).eval()
    reference = output_logprobs(probe, images)
    modules = dict(probe.named_modules())
    result: dict[str, dict[str, dict]] = {}
    with _bar(progress, "sensitivity", len(names) * (len(options.probed_levels) + len(options.bit_levels))) as advance:
        for name in names:
            weight = modules[name].weight
            original = weight.detach().clone()
            only = Scope(types=options.scope.types, include=f"^{re.escape(name)}$")
            result[name] = {"prune": {}, "bits": {}}
            for s in options.probed_levels:
                apply_masks(probe, magnitude_masks(probe, s, only))
                result[name]["prune"][s] = kl_divergence(reference, output_logprobs(probe, images))
                weight.copy_(original)
                advance()
            for bits in options.bit_levels:
                weight.copy_(_shared_weight(original, bits))
                result[name]["bits"][bits] = kl_divergence(reference, output_logprobs(probe, images))
                weight.copy_(original)
                advance()
    return result


def _compact_json_len(value) -> int:
    return len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))


def _manifest_share(path: Path) -> dict[str, int]:
    """Bytes each tensor adds to the archive's JSON manifest: its entry plus its stream-table rows."""
    manifest, _ = read_archive(path)
    row = _compact_json_len({"name": "", "offset": 0, "length": 0, "sha256": "0" * 64}) + 10  # + name, offset digits, comma
    return {e["name"]: _compact_json_len(e) + 1 + sum(row + len(k) for k in e["streams"].values()) for e in manifest["tensors"]}


def _tie_plan_bits(model: nn.Module, bits: dict[str, int], scope: Scope) -> None:
    """Tie each layer to a codebook of 2^bits values (one clustering call per distinct width)."""
    for width in sorted(set(bits.values()) - {FP32_BITS}):
        names = [n for n, b in bits.items() if b == width]
        include = "^(" + "|".join(re.escape(n) for n in names) + ")$"
        tie_to_codebooks(model, KMeansShare(conv_bits=width, linear_bits=width, scope=Scope(types=scope.types, include=include)))


def _pack_bytes(model: nn.Module, names: list[str], tmp: Path) -> tuple[int, dict[str, int]]:
    """(file bytes, per-layer weight bytes with their manifest share) of ``model`` as a .dsz."""
    report = pack(model, tmp / "probe.dsz")
    share = _manifest_share(report.path)
    coded = {t.name: t.bytes for t in report.tensors}
    return report.file_bytes, {n: coded[f"{n}.weight"] + share[f"{n}.weight"] for n in names}


@torch.no_grad()
def uniform_bytes(model: nn.Module, names: list[str], sparsity: float, bits: int, scope: Scope) -> tuple[int, dict[str, int]]:
    """(.dsz file bytes, per-layer bytes) with every layer pruned one-shot to ``sparsity`` and shared at ``bits``."""
    shared = copy.deepcopy(model)
    apply_masks(shared, magnitude_masks(shared, sparsity, scope))
    _tie_plan_bits(shared, dict.fromkeys(names, bits), scope)
    with tempfile.TemporaryDirectory() as tmp:
        return _pack_bytes(untie(shared), names, Path(tmp))


def measure_bytes(
    model: nn.Module, names: list[str], options: AutoOptions, progress: bool = True
) -> tuple[dict[str, dict[tuple[float, int], int]], int]:
    """Per-layer .dsz bytes for every (sparsity, bits) pair (one-shot, before fine-tuning) and the fixed overhead."""
    table: dict[str, dict[tuple[float, int], int]] = {n: {} for n in names}
    fixed = 0
    pairs = [(s, b) for s in (0.0, *options.prune_levels) for b in options.bit_levels]
    with _bar(progress, "byte table", len(pairs)) as advance:
        for s, bits in pairs:
            file_bytes, per_layer = uniform_bytes(model, names, s, bits, options.scope)
            for n in names:
                table[n][(s, bits)] = per_layer[n]
            fixed = max(fixed, file_bytes - sum(per_layer.values()))
            advance()
    return table, fixed


def layer_options(
    sensitivity: dict[str, dict[str, dict]], table: dict[str, dict[tuple[float, int], int]], weights: tuple[float, float] = (1.0, 1.0)
) -> dict[str, list[Option]]:
    """Every (sparsity, bits) option per layer with its cost: the pruning cost plus the sharing cost, each
    scaled by ``weights`` (how much of that damage the trials saw survive fine-tuning)."""
    out = {}
    for name, sizes in table.items():
        prune = sensitivity[name]["prune"]
        out[name] = [
            Option(s, b, size, weights[0] * interpolated_cost(prune, s) + weights[1] * sharing_cost(sensitivity[name], s, b))
            for (s, b), size in sizes.items()
        ]
    return out


def sharing_cost(layer: dict[str, dict], sparsity: float, bits: int) -> float:
    """Sharing measured on the dense layer, scaled by the weights left: a pruned layer clusters fewer (and larger,
    better separated) weights, so its sharing error shrinks at least in proportion (measured: faster)."""
    return layer["bits"][bits] * (1.0 - sparsity)


def interpolated_cost(probed: dict[float, float], sparsity: float) -> float:
    """Cost at ``sparsity``, linear between probed levels (0 when unpruned), extended along the last segment."""
    points = sorted({0.0: 0.0, **probed}.items())
    segment = next((i for i in range(1, len(points)) if sparsity <= points[i][0]), len(points) - 1)
    (s0, c0), (s1, c1) = points[segment - 1], points[segment]
    return c0 + (c1 - c0) * (sparsity - s0) / (s1 - s0)


# -- the plan path --------------------------------------------------------------------------------
def hull_path(options: list[Option]) -> list[Option]:
    """From the cheapest option toward fewer bytes, each step the least cost per byte saved (lower convex hull;
    points on a hull edge are kept, so the path moves in small steps)."""
    current = min(options, key=lambda o: (o.cost, o.bytes))
    path = [current]
    while smaller := [o for o in options if o.bytes < current.bytes]:
        slopes = {o: (o.cost - current.cost) / (current.bytes - o.bytes) for o in smaller}
        least = min(slopes.values())
        current = max((o for o in smaller if slopes[o] <= least + 1e-9 * abs(least) + 1e-15), key=lambda o: o.bytes)
        path.append(current)
    return path


def plan_path(options: dict[str, list[Option]]) -> list[Plan]:
    """Plans from least to most aggressive: merge every layer's hull moves by cost per byte saved."""
    hulls = {name: hull_path(opts) for name, opts in options.items()}
    moves = []
    for name, hull in hulls.items():
        for k in range(1, len(hull)):
            slope = (hull[k].cost - hull[k - 1].cost) / (hull[k - 1].bytes - hull[k].bytes)
            moves.append((slope, k, name))
    plan = {name: hull[0] for name, hull in hulls.items()}
    plans = [dict(plan)]
    for _, k, name in sorted(moves):
        plan[name] = hulls[name][k]
        plans.append(dict(plan))
    return plans


def plan_bytes(plan: Plan, fixed: int) -> int:
    return fixed + sum(o.bytes for o in plan.values())


def plan_dict(plan: Plan) -> dict[str, dict]:
    return {name: {"sparsity": o.sparsity, "bits": o.bits} for name, o in plan.items()}


def measured_plan(model: nn.Module, names: list[str], bits: dict[str, int] | None = None) -> dict[str, dict]:
    """The plan as the model really is: zero fraction per layer (and the bits it was shared at)."""
    return {n: {"sparsity": s, "bits": (bits or {}).get(n, FP32_BITS)} for n, s in zero_fractions(model, names).items()}


def _plan_summary(model: nn.Module, names: list[str], bits: dict[str, int]) -> tuple[float, float]:
    """(sparsity over the layers' weights, mean bits over their non-zero weights)."""
    modules = dict(model.named_modules())
    total = sum(modules[n].weight.numel() for n in names)
    nonzero = {n: int(torch.count_nonzero(modules[n].weight)) for n in names}
    kept = sum(nonzero.values())
    mean_bits = sum(nonzero[n] * bits.get(n, FP32_BITS) for n in names) / kept if kept else 0.0
    return 1.0 - kept / total, mean_bits


# -- stages ---------------------------------------------------------------------------------------------
def zero_fractions(model: nn.Module, names: list[str]) -> dict[str, float]:
    modules = dict(model.named_modules())
    return {n: float((modules[n].weight == 0).float().mean()) for n in names}


@dataclass
class Teacher:
    """The original model, distilled from in every fine-tune of a search; its logits are computed once per image."""

    model: nn.Module
    kd: KD = field(default_factory=KD)
    cache: TeacherCache = field(default_factory=TeacherCache)


def fine_tune(
    model: nn.Module, train: TrainConfig, data: DataBundle, teacher: Teacher | None, progress: bool, hooks: tuple[TrainHook, ...] = ()
) -> None:
    """Train in place, with KD when there is a teacher; no validation pass (the search measures its gate set itself)."""
    quiet = replace(data, val=data.val.subset(0))
    if teacher is None:
        finetune_with_kd(model, train, quiet, hooks=hooks, progress=progress)
    else:
        finetune_with_kd(model, train, quiet, teacher.model, teacher.kd, hooks=hooks, progress=progress, cache=teacher.cache)


def prune_stage(
    model: nn.Module, target: dict[str, float], train: TrainConfig, data: DataBundle, scope: Scope, teacher: Teacher | None, progress: bool
) -> nn.Module:
    """Prune each layer from its present zero fraction to ``target`` along the AGP curve while fine-tuning."""
    start = zero_fractions(model, list(target))

    def masks_at(fraction: float):
        layers = {n: start[n] + fraction * (target[n] - start[n]) for n in target}
        return magnitude_masks(model, 0.0, scope, "layer", layers)

    steps = train.epochs * -(-len(data.train) // train.batch_size)
    end = int(AGP_FRACTION * steps)
    hook = GradualPruningHook(model, masks_at, start=0, end=end, frequency=max(1, end // 50))
    fine_tune(model, train, data, teacher, progress, hooks=(hook,))
    return hook.finalize()


def share_stage(
    model: nn.Module, bits: dict[str, int], train: TrainConfig, data: DataBundle, scope: Scope, teacher: Teacher | None, progress: bool
) -> nn.Module:
    """k-means share each layer at its bits (zeros stay zero), fine-tune the codebooks, untie."""
    shared = copy.deepcopy(model)
    _tie_plan_bits(shared, bits, scope)
    fine_tune(shared, train, data, teacher, progress)
    return untie(shared)


def channel_candidate(model: nn.Module, ratio: float, options: AutoOptions) -> nn.Module:
    """Channels removed by L1 norm, no fine-tuning yet (timed before any training is spent)."""
    return apply_method(model, ChannelPrune(ratio=ratio, round_to=options.round_to, scope=options.scope), Context(progress=False))


def ort_latency_ms(model: nn.Module, input_shape: tuple[int, ...], options: AutoOptions) -> float:
    """Median ONNX Runtime latency at ``options.latency_batch``: what a deployment of the dense model sees."""
    session = ort_session(onnx_bytes(model, input_shape), options.threads)
    return ort_latency(session, input_shape, options.latency_batch, options.latency_repeats).median_ms


# -- the search -------------------------------------------------------------------------------------------
class _Search:
    """One accuracy-aware search: trials along the plan path, each continuing from the last good pruned model,
    each re-weighting the pruning and sharing costs by the damage it measured after fine-tuning."""

    def __init__(
        self,
        model: nn.Module,
        data: DataBundle,
        gate: ImageSet,
        result: "AutoResult",
        architecture,
        options: AutoOptions,
        teacher: Teacher | None,
        progress: bool,
    ):
        self.model, self.data, self.gate, self.architecture, self.teacher = model, data, gate, architecture, teacher
        self.baseline, self.floor = result.baseline_gate_top1, result.baseline_gate_top1 - result.max_drop
        self.options, self.progress = options, progress
        self.names = layer_names(model, options.scope)
        self.params = {n: m.weight.numel() for n, m in options.scope.layers(model)}
        self.images = data.val.subset(options.sensitivity_samples).images
        self.console = Console(quiet=not progress)
        self.trials: list[Trial] = []
        self.pruned: dict[int, nn.Module] = {}  # trial number -> its pruned (unshared) model
        self.shared: dict[int, nn.Module] = {}  # trial number -> its final model
        self.base_label = f"trial {result.trials[-1].number}" if result.trials else "original"  # after a channel stage
        self.weights = (1.0, 1.0)  # scale of the (pruning, sharing) costs
        self.sensitivity: dict = {}
        self.plans: list[Plan] = []
        self.fixed = 0

    # preparation
    def measure_bytes(self) -> None:
        self.table, self.fixed = measure_bytes(self.model, self.names, self.options, self.progress)

    def build_path(self) -> None:
        self.sensitivity = measure_sensitivity(self.model, self.images, self.names, self.options, self.progress)
        self.reference = output_logprobs(self.model, self.images)
        self._rebuild()
        self.console.print(
            f"plan path: {len(self.plans)} plans, estimated {self.est(self.plans[0]):,} -> {self.est(self.plans[-1]):,} bytes "
            f"({self.fixed:,} of them biases, BN and archive overhead)"
        )

    def _rebuild(self) -> None:
        self.plans = plan_path(layer_options(self.sensitivity, self.table, self.weights))

    def est(self, plan: Plan) -> int:
        return plan_bytes(plan, self.fixed)

    def plan_within(self, budget: float) -> Plan:
        """The least aggressive plan estimated to fit ``budget`` (the most aggressive if none does)."""
        return next((p for p in self.plans if self.est(p) <= budget), self.plans[-1])

    # trials
    def start_for(self, plan: Plan, continue_same: bool) -> tuple[str, nn.Module]:
        """Where a trial fine-tunes from: with ``continue_same``, a trial with the same sparsities (a longer
        fine-tune of it); else the latest pruned model within the drop that is no sparser than the plan;
        else the original."""
        planned = _planned_sparsity(plan, self.params)
        for t in reversed([t for t in self.trials if t.number in self.pruned]):
            if continue_same and _sparsities(t.plan) == _sparsities(plan_dict(plan)):
                return f"trial {t.number}, fine-tuned longer", self.pruned[t.number]
            if t.gate_top1_pruned >= self.floor and t.planned_sparsity <= planned + 0.02:
                return f"trial {t.number}", self.pruned[t.number]
        return self.base_label, self.model

    def run_trial(self, plan: Plan, budget: float, start: tuple[str, nn.Module]) -> Trial:
        began = time.perf_counter()
        label, source = start
        trial = Trial(len(self.trials) + 1, "prune+share", label, int(budget), self.est(plan), plan=plan_dict(plan), weights=self.weights)
        trial.planned_sparsity = _planned_sparsity(plan, self.params)
        self.console.print(f"trial {trial.number}: estimated {trial.est_bytes:,} bytes, from {label}")
        bits = {n: o.bits for n, o in plan.items()}
        train = self.options.prune_train()
        sparsity = {n: o.sparsity for n, o in plan.items()}
        pruned = prune_stage(copy.deepcopy(source), sparsity, train, self.data, self.options.scope, self.teacher, self.progress)
        self.pruned[trial.number] = pruned
        trial.gate_top1_pruned = evaluate_accuracy(pruned, self.gate).top1
        trial.sparsity, trial.mean_bits = _plan_summary(pruned, self.names, bits)
        shared = None
        if trial.gate_top1_pruned < self.floor:  # sharing only loses more: save its fine-tuning
            trial.note = "pruning alone exceeds the drop; sharing skipped"
        else:
            shared = share_stage(pruned, bits, self.options.share_train(), self.data, self.options.scope, self.teacher, self.progress)
            self.shared[trial.number] = shared
            trial.gate_top1 = evaluate_accuracy(shared, self.gate).top1
            with tempfile.TemporaryDirectory() as tmp:
                trial.bytes = pack(shared, Path(tmp) / "trial.dsz", self.architecture).file_bytes  # as the final file
        trial.drop = self.baseline - (trial.gate_top1 if trial.gate_top1 is not None else trial.gate_top1_pruned)
        trial.feasible = trial.gate_top1 is not None and trial.gate_top1 >= self.floor
        self._calibrate(plan, pruned, shared)
        trial.seconds = time.perf_counter() - began
        self.trials.append(trial)
        self._print(trial)
        return trial

    def _calibrate(self, plan: Plan, pruned: nn.Module, shared: nn.Module | None) -> None:
        """Scale each cost by measured / predicted damage (KL after fine-tuning vs the one-layer sum) and rebuild
        the path: the next plan spends less of whichever the trials show is costlier than it looked."""
        pruned_out = output_logprobs(pruned, self.images)
        predicted = sum(interpolated_cost(self.sensitivity[n]["prune"], o.sparsity) for n, o in plan.items() if o.sparsity > 0)
        scale_p = kl_divergence(self.reference, pruned_out) / predicted if predicted > 1e-9 else self.weights[0]
        scale_b = self.weights[1]
        if shared is not None:
            predicted = sum(sharing_cost(self.sensitivity[n], o.sparsity, o.bits) for n, o in plan.items())
            scale_b = kl_divergence(pruned_out, output_logprobs(shared, self.images)) / predicted if predicted > 1e-9 else scale_b
        self.weights = tuple(min(1e3, max(1e-3, w)) for w in (scale_p, scale_b))
        self._rebuild()

    def _print(self, t: Trial) -> None:
        size = f"{t.bytes:,} bytes" if t.bytes is not None else "not packed"
        shared = f"{t.gate_top1:.2f}" if t.gate_top1 is not None else "-"
        self.console.print(
            f"  sparsity {100 * t.sparsity:.1f}%, {t.mean_bits:.2f} bits per non-zero weight, {size}; {self.options.gate} Top-1 "
            f"{t.gate_top1_pruned:.2f} pruned, {shared} shared, drop {t.drop:.2f}: {'ok' if t.feasible else 'too inaccurate'} "
            f"[{t.seconds:.0f}s]; cost weights now prune {self.weights[0]:.3g}, share {self.weights[1]:.3g}"
        )

    # strategies
    def smallest_within_drop(self) -> Trial | None:
        """Bisect the byte budget (geometrically) for the smallest plan within the accuracy bound."""
        low, high, best = self.est(self.plans[-1]), self.est(self.plans[0]), None
        while len(self.trials) < self.options.max_trials:
            last_chance = best is None and len(self.trials) == self.options.max_trials - 1
            plan = self.plans[0] if last_chance else self._plan_between(low, high)  # nothing good yet: the safest plan
            if plan is None:
                break
            start = self.start_for(plan, continue_same=False)  # build on the last good model, not a failed one
            if self._known_to_fail(plan, start[0]):
                low = max(low, self.est(plan))
                continue
            trial = self.run_trial(plan, math.sqrt(low * high), start)
            if trial.feasible:
                best = trial if best is None or trial.bytes < best.bytes else best
                high = min(high, trial.est_bytes)
            else:
                low = max(low, trial.est_bytes)
        return best

    def _plan_between(self, low: float, high: float) -> Plan | None:
        """The plan nearest the geometric middle of (low, high), both ends excluded (None once they meet)."""
        inside = [p for p in self.plans if low < self.est(p) < high]
        middle = math.log(low * high) / 2
        return min(inside, key=lambda p: abs(math.log(self.est(p)) - middle), default=None)

    def _known_to_fail(self, plan: Plan, start: str) -> bool:
        """These sparsities from this start already failed at the pruning stage (training is deterministic)."""
        sparsity = _sparsities(plan_dict(plan))
        return any(t.start == start and t.gate_top1_pruned < self.floor and _sparsities(t.plan) == sparsity for t in self.trials if t.plan)

    def least_aggressive_within(self, target: int) -> Trial | None:
        """The least aggressive plan estimated to fit ``target``. Too big: correct the estimate by the bytes
        measured and take a smaller plan; too inaccurate: the re-weighted plan for the same budget (the
        same sparsities again are a longer fine-tune, until that gains less than 0.1 point)."""
        correction = 1.0
        while len(self.trials) < self.options.max_trials and not self._stalled():
            plan = self.plan_within(target / correction)
            if self.est(plan) > target / correction:
                break  # the corrected estimate fits nothing
            trial = self.run_trial(plan, target / correction, self.start_for(plan, continue_same=True))
            size = trial.bytes if trial.bytes is not None else trial.est_bytes
            if trial.feasible and size <= target:
                return trial
            if size > target:
                trial.note = _join(trial.note, "over the size target")
                correction *= size / trial.est_bytes
        return None

    def _stalled(self) -> bool:
        """Two inaccurate trials of the same sparsities, the second gaining less than 0.1 point: training more won't do."""
        last = self.trials[-2:]
        if len(last) < 2 or not last[0].plan or last[0].feasible or _sparsities(last[0].plan) != _sparsities(last[1].plan):
            return False
        return last[1].drop > last[0].drop - 0.1

    def closest(self, target: int | None) -> Trial | None:
        """When nothing met the budget: the finished trial within the size target (if any) with the least drop."""
        done = [t for t in self.trials if t.number in self.shared]
        return min(done, key=lambda t: (target is not None and t.bytes > target, t.drop), default=None)


def _sparsities(plan: dict[str, dict]) -> dict[str, float]:
    return {n: v["sparsity"] for n, v in plan.items()}


def _planned_sparsity(plan: Plan, params: dict[str, int]) -> float:
    """The plan's sparsity over all its layers' weights."""
    return sum(o.sparsity * params[n] for n, o in plan.items()) / sum(params[n] for n in plan)


def _join(note: str, more: str) -> str:
    return f"{note}; {more}" if note else more


@contextmanager
def _bar(progress: bool, label: str, total: int):
    columns = (TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not progress, transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda: bar.advance(task)


# -- the entry point ---------------------------------------------------------------------------------------
def auto_compress(
    model: nn.Module,
    data: DataBundle,
    max_drop: float,
    target_bytes: int | None = None,
    target_latency_ms: float | None = None,
    out_dir: str | Path = "runs/auto",
    epochs: int | None = None,
    progress: bool = True,
    architecture: dict | None = None,
    options: AutoOptions | None = None,
) -> AutoResult:
    """Search per-layer compression for the smallest accuracy loss within the budget; write the result to ``out_dir``.

    ``target_bytes``: the .dsz file must fit; ``target_latency_ms``: ONNX Runtime median at
    ``options.latency_batch`` must fit; neither: the smallest .dsz within ``max_drop`` (Top-1
    points, checked on ``options.gate``). The caller's model is not modified.
    """
    options = replace(options or AutoOptions(), **({"epochs": epochs} if epochs is not None else {}))
    max_drop = check_max_drop(max_drop)
    if target_bytes is not None and target_bytes < 1:
        raise InputError(f"target_bytes must be >= 1, got {target_bytes}")
    if target_latency_ms is not None and not target_latency_ms > 0:
        raise InputError(f"target_latency_ms must be positive, got {target_latency_ms}")
    gate = data.val if options.gate == "val" else data.test
    if not len(gate) or not len(data.val):
        raise InputError("the search needs validation images for its sensitivity analysis and gate: use a val_size > 0")
    began = time.perf_counter()
    console = Console(quiet=not progress)
    model = copy.deepcopy(model).eval()
    teacher = Teacher(copy.deepcopy(model)) if options.distill else None
    result = AutoResult(
        max_drop,
        options.gate,
        baseline_top1=evaluate_accuracy(model, data.test).top1,
        baseline_gate_top1=evaluate_accuracy(model, gate).top1,
        fp32_bytes=fp32_param_bytes(model),
        target_bytes=target_bytes,
        target_latency_ms=target_latency_ms,
    )
    console.print(
        f"baseline: {options.gate} Top-1 {result.baseline_gate_top1:.2f}%, test Top-1 {result.baseline_top1:.2f}%, fp32 {result.fp32_bytes:,} bytes"
    )
    if target_latency_ms is not None:
        model = _latency_stage(model, data, gate, result, options, teacher, progress, console)
    channels_ok = all(t.feasible for t in result.trials[-1:])  # a channel stage too inaccurate ends the search
    final, bits, sensitivity, searched = model, {}, None, channels_ok and (target_bytes is not None or target_latency_ms is None)
    if searched:
        final, bits, sensitivity = _size_stage(model, data, gate, result, architecture, options, teacher, progress, target_bytes)
    _finish(final, bits, data, gate, result, Path(out_dir), architecture, options)
    if searched and not bits:
        result.met, result.reason = False, "not met: no trial finished within the drop; wrote the model unshared"
    result.seconds = time.perf_counter() - began
    write_reports(result, Path(out_dir), sensitivity)
    return result


def _latency_stage(
    model, data, gate, result: AutoResult, options: AutoOptions, teacher: Teacher | None, progress: bool, console: Console
) -> nn.Module:
    """Remove the fewest channels that meet the latency target, then fine-tune; a trial like the others."""
    shape = data.input_shape
    result.baseline_latency_ms = ort_latency_ms(model, shape, options)
    console.print(f"ONNX Runtime latency at batch {options.latency_batch}: {result.baseline_latency_ms:.3f} ms")
    if result.baseline_latency_ms <= result.target_latency_ms:
        return model
    began = time.perf_counter()
    for ratio in options.channel_ratios:
        candidate = channel_candidate(model, ratio, options)
        ms = ort_latency_ms(candidate, shape, options)
        console.print(f"  {100 * ratio:.0f}% of channels removed: {ms:.3f} ms")
        if ms <= LATENCY_HEADROOM * result.target_latency_ms:
            break
    else:
        raise InputError(
            f"--target-latency {result.target_latency_ms:g} ms is out of reach: with {100 * ratio:.0f}% of the channels removed "
            f"the model still takes {ms:.3f} ms at batch {options.latency_batch}"
        )
    result.channel_ratio = ratio
    _finetune_channels(candidate, data, gate, result, options, teacher, progress, console, ms, time.perf_counter() - began)
    return candidate


def _finetune_channels(
    model, data, gate, result: AutoResult, options: AutoOptions, teacher: Teacher | None, progress, console, ms: float, spent: float
) -> None:
    """Fine-tune the channel-pruned model, again while it is too inaccurate and still gaining 0.1 point a round
    (the back-off here: removing fewer channels would miss the latency target)."""
    rounds = options.max_trials if result.target_bytes is None else max(1, options.max_trials // 2)  # leave trials for the size search
    for attempt in range(rounds):
        began = time.perf_counter()
        fine_tune(model, replace(options.prune_train(), seed=options.seed + attempt), data, teacher, progress)
        top1 = evaluate_accuracy(model, gate).top1
        drop = result.baseline_gate_top1 - top1
        start = "original" if attempt == 0 else f"trial {len(result.trials)}, fine-tuned longer"
        trial = Trial(len(result.trials) + 1, "channel", start, gate_top1=top1, drop=drop, latency_ms=ms, feasible=drop <= result.max_drop)
        trial.note = f"{100 * result.channel_ratio:.0f}% of channels removed (L1), {ms:.3f} ms"
        trial.seconds = time.perf_counter() - began + (spent if attempt == 0 else 0.0)
        result.trials.append(trial)
        console.print(f"  fine-tuned: {options.gate} Top-1 {top1:.2f} (drop {drop:.2f})")
        previous = result.trials[-2].drop if attempt else math.inf
        if trial.feasible or drop > previous - 0.1:
            return


def _size_stage(model, data, gate, result: AutoResult, architecture, options: AutoOptions, teacher: Teacher | None, progress: bool, target):
    """The prune + share search; returns (final model, its bits per layer, the sensitivity measured)."""
    search = _Search(model, data, gate, result, architecture, options, teacher, progress)
    if target is not None:
        _check_reachable(model, search.names, target, options)
    search.measure_bytes()
    search.build_path()
    search.trials = list(result.trials)  # numbering continues after a latency stage
    chosen = search.least_aggressive_within(target) if target is not None else search.smallest_within_drop()
    result.trials = search.trials
    pick = chosen or search.closest(target)
    if pick is None:
        return model, {}, search.sensitivity
    return search.shared[pick.number], {n: v["bits"] for n, v in pick.plan.items()}, search.sensitivity


def _check_reachable(model: nn.Module, names: list[str], target: int, options: AutoOptions) -> None:
    """One pack of the most aggressive plan: a target below it fails at once, before any measuring or training."""
    sparsity, bits = max(options.prune_levels), min(options.bit_levels)
    smallest, per_layer = uniform_bytes(model, names, sparsity, bits, options.scope)
    if target < smallest:
        raise InputError(
            f"--target-size {target:,} bytes is out of reach: the most aggressive plan ({sparsity:.0%} sparse, {bits} bits per layer) "
            f"takes about {smallest:,} bytes, {smallest - sum(per_layer.values()):,} of them biases, BN and archive overhead"
        )


def _finish(final, bits, data, gate, result: AutoResult, out_dir: Path, architecture, options: AutoOptions) -> None:
    """Pack, check the round trip, export ONNX of the decoded model, measure; then decide whether the budget is met."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report, decoded = pack_verified(final, out_dir / "model.dsz", architecture)
    onnx_path = export_onnx(decoded, out_dir / "model.onnx", data.input_shape)
    result.paths = {"dsz": report.path, "onnx": onnx_path, "plan": out_dir / "plan.json"}
    result.bytes = report.file_bytes
    result.top1 = evaluate_accuracy(decoded, data.test).top1
    result.gate_top1 = evaluate_accuracy(decoded, gate).top1
    result.plan = measured_plan(decoded, layer_names(decoded, options.scope), bits)
    if result.target_latency_ms is not None:
        result.latency_ms = ort_latency_ms(decoded, data.input_shape, options)
    result.met, result.reason = _verdict(result)
    _write_json(result.paths["plan"], result.plan)


def _verdict(r: AutoResult) -> tuple[bool, str]:
    misses = []
    gate_drop = r.baseline_gate_top1 - r.gate_top1
    if gate_drop > r.max_drop:
        misses.append(f"{r.gate} Top-1 drop {gate_drop:.2f} > {r.max_drop:g}")
    if r.target_bytes is not None and r.bytes > r.target_bytes:
        misses.append(f"{r.bytes:,} bytes > target {r.target_bytes:,}")
    if r.target_latency_ms is not None and r.latency_ms > r.target_latency_ms:
        misses.append(f"{r.latency_ms:.3f} ms > target {r.target_latency_ms:g} ms")
    return (not misses, "met" if not misses else "not met: " + ", ".join(misses))


# -- reports -----------------------------------------------------------------------------------------------
def _write_json(path: Path, payload) -> None:
    write_atomic(path, (json.dumps(payload, indent=2) + "\n").encode())


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


TRIAL_COLUMNS = [
    Column("trial", lambda t: t.number),
    Column("kind", lambda t: t.kind),
    Column("from", lambda t: t.start),
    Column("budget", lambda t: t.budget, "{:,}"),
    Column("sparsity %", lambda t: None if t.sparsity is None else 100 * t.sparsity, "{:.1f}"),
    Column("bits/non-zero", lambda t: t.mean_bits, "{:.2f}"),
    Column("est. bytes", lambda t: t.est_bytes, "{:,}"),
    Column(".dsz bytes", lambda t: t.bytes, "{:,}"),
    Column("Top-1 pruned", lambda t: t.gate_top1_pruned, "{:.2f}"),
    Column("Top-1", lambda t: t.gate_top1, "{:.2f}"),
    Column("drop", lambda t: t.drop, "{:.2f}"),
    Column("ok", lambda t: "yes" if t.feasible else "no"),
    Column("s", lambda t: t.seconds, "{:.0f}"),
    Column("note", lambda t: t.note),
]


def write_reports(result: AutoResult, out_dir: Path, sensitivity: dict | None) -> None:
    payload = {**result.to_dict(), "sensitivity": _sensitivity_json(sensitivity), "environment": environment()}
    result.paths.update(report_json=out_dir / "report.json", report_md=out_dir / "report.md")
    payload["paths"] = {k: str(v) for k, v in result.paths.items()}
    _write_json(result.paths["report_json"], payload)
    result.paths["report_md"].write_text(markdown_report(result))


def _sensitivity_json(sensitivity: dict | None) -> dict | None:
    if sensitivity is None:
        return None
    return {n: {kind: {str(k): v for k, v in costs.items()} for kind, costs in layer.items()} for n, layer in sensitivity.items()}


def markdown_report(r: AutoResult) -> str:
    budget = [f"max Top-1 drop {r.max_drop:g} points ({r.gate} set)"]
    if r.target_bytes is not None:
        budget.append(f".dsz at most {r.target_bytes:,} bytes")
    if r.target_latency_ms is not None:
        budget.append(f"ONNX Runtime latency at most {r.target_latency_ms:g} ms")
    lines = [
        "# Automatic compression",
        "",
        f"Budget: {', '.join(budget)}. Result: **{r.reason}**.",
        "",
        "| | baseline | compressed |",
        "|---|---|---|",
        f"| Top-1 % (test) | {r.baseline_top1:.2f} | {_fmt(r.top1, '.2f')} |",
        f"| Top-1 % ({r.gate}, the gate) | {r.baseline_gate_top1:.2f} | {_fmt(r.gate_top1, '.2f')} |",
        f"| bytes on disk | {r.fp32_bytes:,} (fp32) | {_fmt(r.bytes, ',')} (.dsz) |",
        f"| compression ratio | 1.0x | {_fmt(r.ratio, '.1f')}x |",
    ]
    if r.target_latency_ms is not None:
        lines.append(f"| ORT latency ms | {_fmt(r.baseline_latency_ms, '.3f')} | {_fmt(r.latency_ms, '.3f')} |")
    lines += ["", f"Top-1 drop on test: {_fmt(r.drop, '.2f')} points. Search time {r.seconds:.0f} s.", "", "## Trials", ""]
    lines.append(markdown_table(r.trials, TRIAL_COLUMNS))
    lines += ["## Chosen plan", "", "| layer | sparsity % | bits |", "|---|---|---|"]
    lines += [f"| {n} | {100 * v['sparsity']:.1f} | {v['bits'] if v['bits'] != FP32_BITS else 'fp32'} |" for n, v in r.plan.items()]
    return "\n".join(lines) + "\n"
