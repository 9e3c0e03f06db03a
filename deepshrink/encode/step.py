"""The ``pack`` recipe step: write the final model as an archive and prove it decodes.

An output step: it changes no weights, it writes ``model.dsz`` (the entropy-coded
container, restored and checked before it counts) into the run folder, or, for a
quantized model, its bit-packed integer weights. ONNX-in attaches its own backend
for ONNX graphs (``deepshrink.onnx_in.pack``).
"""

import copy
import json
from dataclasses import asdict, dataclass

from torch import nn

from deepshrink.compress.quant.modules import fake_quant_layers  # encode sits above compress (tests/test_layers.py)
from deepshrink.compress.quant.storage import load_quantized_model, save_quantized_model
from deepshrink.core.config import Config
from deepshrink.core.files import write_atomic
from deepshrink.core.methods import Context, Written, method
from deepshrink.encode.pack import pack_verified


@dataclass(frozen=True)
class Pack(Config):
    """Write the model as an entropy-coded .dsz archive (and ONNX of the decoded model)."""

    onnx: bool = True


@method("pack", Pack, needs=("out_dir",), output=True)
class PackMethod:
    def torch(self, model: nn.Module, cfg: Pack, ctx: Context) -> Written:
        if fake_quant_layers(model):
            return _pack_quantized(model, cfg, ctx)
        report, decoded = pack_verified(model, ctx.out_dir / "model.dsz", ctx.architecture)
        streams = {
            "file_bytes": report.file_bytes,
            "tensors": [{**asdict(t), "bits_per_weight": t.bits_per_weight} for t in report.tensors],
        }
        streams_path = write_atomic(ctx.out_dir / "dsz_streams.json", (json.dumps(streams, indent=2) + "\n").encode())
        files = {"archive": report.path, "streams": streams_path}
        return Written(files, decoded, "entropy coded .dsz", report.file_bytes, export=cfg.onnx)


def _pack_quantized(model: nn.Module, cfg: Pack, ctx: Context) -> Written:
    """A quantized model's archive is its bit-packed integer weights (safetensors, no pickle)."""
    path = ctx.out_dir / "model.qpack.safetensors"
    file_bytes = save_quantized_model(model, path)
    restored = load_quantized_model(copy.deepcopy(model), path)
    return Written({"archive": path}, restored, "bit-packed integers", file_bytes, export=cfg.onnx)
