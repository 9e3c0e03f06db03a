"""Structured pruning of BERT-like encoders: attention heads and FFN neurons, removed physically.

A head is a slice of the query/key/value rows and of the attention output's
columns; an FFN neuron is a row of the intermediate dense layer and a column
of the output dense layer. Removing them leaves ordinary, smaller
``nn.Linear`` layers (the attention reshapes by ``attention_head_size``, so
fewer heads just work), which is why the ONNX file and the latency shrink too.

Importance: ``activation`` measures each head's / neuron's contribution to the
block output on token batches (mean norm over real tokens), ``magnitude`` uses
weight norms only (no data needed).
"""

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import nn

from deepshrink.compress.prune.structured import slice_layer
from deepshrink.core.config import Config, check_range
from deepshrink.core.errors import InputError
from deepshrink.core.methods import Context, method
from deepshrink.core.modules import replace_module
from deepshrink.transformers.distill import TransformerDistill, distill
from deepshrink.transformers.load import Batch, check_batches


@dataclass(frozen=True)
class TransformerPrune(Config):
    """Remove ``heads`` of each layer's attention heads and ``neurons`` of its FFN neurons.

    At least one head and ``round_to`` neurons stay per layer; kept neuron counts
    are rounded up to a multiple of ``round_to``. ``distill`` repairs the pruned
    model against the original on the context's token batches.
    """

    heads: float = 0.0
    neurons: float = 0.0
    importance: Literal["activation", "magnitude"] = "activation"
    round_to: int = 1
    distill: TransformerDistill | None = None

    def __post_init__(self) -> None:
        check_range("heads", self.heads, 0.0, 1.0)
        check_range("neurons", self.neurons, 0.0, 1.0)
        if self.importance not in ("activation", "magnitude"):
            raise InputError(f"importance: {self.importance!r} is not one of ['activation', 'magnitude']")
        if self.round_to < 1:
            raise InputError(f"round_to must be >= 1, got {self.round_to}")


@dataclass
class AttentionBlock:
    name: str
    attn: nn.Module  # has query, key, value, attention_head_size, num_attention_heads
    out: nn.Linear  # the attention output projection


@dataclass
class FFNBlock:
    name: str
    up: nn.Linear  # intermediate dense
    down: nn.Linear  # output dense


def attention_blocks(model: nn.Module) -> list[AttentionBlock]:
    """BERT-style attention blocks: ``<block>.self.{query,key,value}`` and ``<block>.output.dense``."""
    blocks = []
    for name, module in model.named_modules():
        attn, out = getattr(module, "self", None), getattr(getattr(module, "output", None), "dense", None)
        projections = all(isinstance(getattr(attn, k, None), nn.Linear) for k in ("query", "key", "value"))
        if isinstance(out, nn.Linear) and projections and hasattr(attn, "attention_head_size"):
            blocks.append(AttentionBlock(name, attn, out))
    return blocks


def ffn_blocks(model: nn.Module) -> list[FFNBlock]:
    """BERT-style FFNs: ``<layer>.intermediate.dense`` followed by ``<layer>.output.dense``."""
    blocks = []
    for name, module in model.named_modules():
        up = getattr(getattr(module, "intermediate", None), "dense", None)
        down = getattr(getattr(module, "output", None), "dense", None)
        if isinstance(up, nn.Linear) and isinstance(down, nn.Linear) and down.in_features == up.out_features:
            blocks.append(FFNBlock(name, up, down))
    return blocks


# -- importance ---------------------------------------------------------------------------
def _head_size(block: AttentionBlock) -> int:
    return int(block.attn.attention_head_size)


def head_importance_magnitude(block: AttentionBlock) -> torch.Tensor:
    d = _head_size(block)
    value = block.attn.value.weight.detach().reshape(-1, d, block.attn.value.in_features)
    out = block.out.weight.detach().reshape(block.out.out_features, -1, d)
    return value.flatten(1).norm(dim=1) * out.transpose(0, 1).flatten(1).norm(dim=1)


def neuron_importance_magnitude(block: FFNBlock) -> torch.Tensor:
    return block.up.weight.detach().norm(dim=1) * block.down.weight.detach().norm(dim=0)


def _activation_scores(model: nn.Module, batches: Sequence[Batch], layers: list[nn.Linear], scores: list) -> list[torch.Tensor]:
    """Mean over real tokens of ``scores[i](layer, input)`` for each layer's input, in one pass over the batches."""
    totals: list[torch.Tensor | None] = [None] * len(layers)
    state: dict[str, torch.Tensor] = {}

    def hook(i: int):
        def record(layer: nn.Linear, inputs: tuple[torch.Tensor, ...]) -> None:
            s = scores[i](layer, inputs[0][state["mask"]]).sum(dim=0)  # inputs[0][mask]: [real tokens, features]
            totals[i] = s if totals[i] is None else totals[i] + s

        return record

    handles = [layer.register_forward_pre_hook(hook(i)) for i, layer in enumerate(layers)]
    tokens = 0
    try:
        with torch.inference_mode():
            for batch in batches:
                state["mask"] = batch["attention_mask"].bool()
                tokens += int(state["mask"].sum())
                model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    return [t / max(tokens, 1) for t in totals]


def _head_contribution(d: int):
    """Norm of each head's share of the output projection, per token."""

    def score(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        heads = x.shape[1] // d
        w = layer.weight.detach().reshape(layer.out_features, heads, d)
        return torch.einsum("thd,ohd->tho", x.reshape(-1, heads, d), w).norm(dim=2)

    return score


def _neuron_contribution(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return x.abs() * layer.weight.detach().norm(dim=0)


def head_scores(model: nn.Module, blocks: list[AttentionBlock], importance: str, batches: Sequence[Batch] | None) -> list[torch.Tensor]:
    if importance == "magnitude":
        return [head_importance_magnitude(b) for b in blocks]
    return _activation_scores(model, _need(batches), [b.out for b in blocks], [_head_contribution(_head_size(b)) for b in blocks])


def neuron_scores(model: nn.Module, blocks: list[FFNBlock], importance: str, batches: Sequence[Batch] | None) -> list[torch.Tensor]:
    if importance == "magnitude":
        return [neuron_importance_magnitude(b) for b in blocks]
    return _activation_scores(model, _need(batches), [b.down for b in blocks], [_neuron_contribution] * len(blocks))


def _need(batches: Sequence[Batch] | None) -> list[Batch]:
    if not batches:
        raise InputError("activation importance needs token batches (texts or token ids); use importance='magnitude' without data")
    return check_batches(batches)


# -- surgery --------------------------------------------------------------------------
def keep_top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Sorted indices of the ``keep`` highest scores (ties broken by index: deterministic)."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return torch.tensor(sorted(order[:keep]), dtype=torch.long)


def _dotted(block_name: str, path: str) -> str:
    return f"{block_name}.{path}" if block_name else path


def prune_heads(model: nn.Module, block: AttentionBlock, keep: torch.Tensor) -> None:
    """Keep only heads ``keep`` of ``block``: rows of query/key/value, columns of the output projection."""
    d = _head_size(block)
    rows = (keep[:, None] * d + torch.arange(d)).reshape(-1)
    for key in ("query", "key", "value"):
        replace_module(model, _dotted(block.name, f"self.{key}"), slice_layer(getattr(block.attn, key), out=rows))
    block.out = slice_layer(block.out, inp=rows)
    replace_module(model, _dotted(block.name, "output.dense"), block.out)
    block.attn.num_attention_heads = len(keep)
    block.attn.all_head_size = len(keep) * d


def prune_neurons(model: nn.Module, block: FFNBlock, keep: torch.Tensor) -> None:
    """Keep only FFN neurons ``keep``: rows of the up projection, columns of the down projection."""
    block.up, block.down = slice_layer(block.up, out=keep), slice_layer(block.down, inp=keep)
    replace_module(model, _dotted(block.name, "intermediate.dense"), block.up)
    replace_module(model, _dotted(block.name, "output.dense"), block.down)


def kept_count(total: int, ratio: float, round_to: int = 1, minimum: int = 1) -> int:
    """How many to keep: ``total`` less ``round(ratio * total)``, rounded up to ``round_to``, at least ``minimum``."""
    keep = total - int(round(ratio * total))
    keep = min(total, math.ceil(keep / round_to) * round_to)
    return max(min(total, minimum), keep)


def prune_transformer(model: nn.Module, cfg: TransformerPrune, batches: Sequence[Batch] | None = None) -> nn.Module:
    """Prune ``model`` in place: heads first, then FFN neurons scored on the head-pruned model.

    Distillation (``cfg.distill``) is left to the registered method, which holds the teacher.
    """
    heads, ffns = attention_blocks(model), ffn_blocks(model)
    if (cfg.heads > 0 and not heads) or (cfg.neurons > 0 and not ffns):
        raise InputError(
            f"no BERT-style {'attention blocks' if cfg.heads > 0 and not heads else 'FFN blocks'} found in {type(model).__name__}"
        )
    if cfg.heads > 0:
        for block, scores in zip(heads, head_scores(model, heads, cfg.importance, batches), strict=True):
            prune_heads(model, block, keep_top(scores, kept_count(len(scores), cfg.heads)))
    if cfg.neurons > 0:
        for block, scores in zip(ffns, neuron_scores(model, ffns, cfg.importance, batches), strict=True):
            prune_neurons(model, block, keep_top(scores, kept_count(len(scores), cfg.neurons, cfg.round_to, cfg.round_to)))
    return model


@method("transformer_prune", TransformerPrune, needs=("batches?",))
class TransformerPruneMethod:
    def torch(self, model: nn.Module, cfg: TransformerPrune, ctx: Context) -> nn.Module:
        """``ctx.batches``: token batches (needed for activation importance and distillation)."""
        teacher = copy.deepcopy(model).eval() if cfg.distill else None
        pruned = prune_transformer(model.eval(), cfg, ctx.batches)
        if cfg.distill is not None:
            distill(pruned, teacher, _need(ctx.batches), cfg.distill)
        return pruned.eval()

    def restore(self, model: nn.Module, cfg: TransformerPrune, ctx: Context, saved: dict) -> nn.Module:
        """The kept counts depend on the ratios only, so weight magnitudes give the same shapes without data."""
        return prune_transformer(copy.deepcopy(model).eval(), replace(cfg, importance="magnitude", distill=None)).eval()


def head_counts(model: nn.Module) -> list[int]:
    return [int(b.attn.num_attention_heads) for b in attention_blocks(model)]


def ffn_sizes(model: nn.Module) -> list[int]:
    return [b.up.out_features for b in ffn_blocks(model)]
