"""ONNX export of encoders (dynamic batch and sequence axes) and ONNX Runtime execution.

Inputs are ``input_ids`` and ``attention_mask`` (and ``token_type_ids`` when
asked for), all int64. Outputs are ``last_hidden_state``, plus ``logits`` first
for a model with a task head. The example used for tracing pads one sequence,
so the attention-mask logic is traced rather than folded away.
"""

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from deepshrink.compress.quant.onnx_dynamic import WeightType, dynamic_onnx_from_torch
from deepshrink.core.errors import InputError
from deepshrink.export.onnx import OPSET, export_checked
from deepshrink.transformers.fidelity import mean_pool
from deepshrink.transformers.load import Batch, check_batches

INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class _Outputs(nn.Module):
    """Positional inputs in, plain tensors out: what ``torch.onnx.export`` traces."""

    def __init__(self, model: nn.Module, with_token_types: bool) -> None:
        super().__init__()
        self.model, self.with_token_types = model, with_token_types
        self.with_head = hasattr(model, "base_model") and model.base_model is not model

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        kwargs = {"token_type_ids": token_type_ids} if self.with_token_types else {}
        if self.with_head:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, **kwargs)
            return out.logits, out.hidden_states[-1]
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state


def encoder_onnx_bytes(model: nn.Module, token_type_ids: bool = False, opset: int = OPSET) -> bytes:
    """The encoder as checked ONNX (``onnx.checker`` full check), batch and sequence axes dynamic."""
    wrapper = _Outputs(model, token_type_ids).train(model.training)  # so the export restores the caller's mode
    inputs = list(INPUTS[: 3 if token_type_ids else 2])
    outputs = ["logits", "last_hidden_state"] if wrapper.with_head else ["last_hidden_state"]
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6, 0, 0]]) % _vocab_size(model)
    mask = torch.tensor([[1] * 8, [1] * 6 + [0] * 2])
    example = (ids, mask, torch.zeros_like(ids)) if token_type_ids else (ids, mask)
    axes = {name: {0: "batch", 1: "sequence"} for name in inputs + ["last_hidden_state"]}
    axes.update({"logits": {0: "batch"}} if wrapper.with_head else {})
    return export_checked(
        wrapper, example, "encoder ONNX", input_names=inputs, output_names=outputs, dynamic_axes=axes, opset_version=opset
    )


def encoder_dynamic_onnx(model: nn.Module, token_type_ids: bool = False, weight_type: WeightType = "uint8") -> bytes:
    """A ``DynamicQuant`` encoder as dynamic int8 ONNX with the torch model's own codes and scales."""
    return dynamic_onnx_from_torch(model, lambda proxy: encoder_onnx_bytes(proxy, token_type_ids), weight_type)


def _vocab_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    return int(getattr(config, "vocab_size", 0) or 9) if config is not None else 9


def ort_feed(session, batch: Batch) -> dict[str, np.ndarray]:
    """The session's inputs from a token batch (token_type_ids default to zeros)."""
    feed = {}
    for inp in session.get_inputs():
        if inp.name in batch:
            feed[inp.name] = batch[inp.name].numpy().astype(np.int64)
        elif inp.name == "token_type_ids":
            feed[inp.name] = np.zeros_like(batch["input_ids"].numpy(), dtype=np.int64)
        else:
            raise InputError(f"the ONNX model wants input {inp.name!r}; the batch has {sorted(batch)}")
    return feed


def ort_outputs(session, batch: Batch) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, ort_feed(session, batch)), strict=True))


def ort_pooled(session, batches: Sequence[Batch]) -> torch.Tensor:
    """Mean-pooled ``last_hidden_state`` from ONNX Runtime, like ``pooled_embeddings`` in torch."""
    pooled = []
    for batch in check_batches(batches):
        hidden = torch.from_numpy(ort_outputs(session, batch)["last_hidden_state"])
        pooled.append(mean_pool(hidden, batch["attention_mask"]))
    return torch.cat(pooled).float()


def ort_logits(session, batches: Sequence[Batch]) -> torch.Tensor:
    return torch.cat([torch.from_numpy(ort_outputs(session, b)["logits"]) for b in check_batches(batches)]).float()
