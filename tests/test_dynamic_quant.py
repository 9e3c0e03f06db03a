"""Dynamic int8: the arithmetic against ONNX's own operator, torch vs ONNX Runtime agreement, sizes, bad input."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from deepshrink.compress.quant.dynamic import (
    DynamicQuant,
    DynamicQuantEmbedding,
    DynamicQuantLinear,
    dequantized_copy,
    quantize_activation,
    quantize_dynamic,
    quantize_per_channel,
)
from deepshrink.compress.quant.onnx_dynamic import RewriteReport, default_policy, dynamic_onnx_bytes, quantize_onnx_dynamic
from deepshrink.core.config import Scope
from deepshrink.core.errors import InputError
from deepshrink.core.methods import apply_method
from deepshrink.export import onnx_bytes, ort_session

pytestmark = pytest.mark.unit


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32), nn.GELU(), nn.Linear(32, 10)).eval()


class Tokens(nn.Module):
    """Embedding -> 3-d Linear (exported as Gather and MatMul, BERT's two patterns)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.embed = nn.Embedding(50, 16)
        self.proj = nn.Linear(16, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.proj(self.embed(ids))


def op_types(proto: bytes | onnx.ModelProto) -> list[str]:
    model = onnx.load_from_string(proto) if isinstance(proto, bytes) else proto
    return [n.op_type for n in model.graph.node]


def dql_reference(x: np.ndarray) -> tuple[np.ndarray, np.float32, np.uint8]:
    """ONNX Runtime's own DynamicQuantizeLinear on ``x``."""
    graph = helper.make_graph(
        [helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"])],
        "dql",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info(n, t, s) for n, t, s in (("q", TensorProto.UINT8, list(x.shape)), ("s", 1, []), ("z", 2, []))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return tuple(ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x}))


@pytest.mark.parametrize("shift", [0.0, 3.0, -3.0])
def test_activation_quantization_equals_onnx_dynamic_quantize_linear(shift: float) -> None:
    x = (torch.randn(7, 33, generator=torch.Generator().manual_seed(2)) + shift).numpy()
    x[0, :4] = [0.5, -0.5, 1.5, 2.5]  # exact halves of some scale are rare; edge values help anyway
    q, scale, zero_point = quantize_activation(torch.from_numpy(x))
    q_ref, s_ref, z_ref = dql_reference(x)
    assert np.array_equal(q.numpy().astype(np.uint8), q_ref)
    assert float(scale) == float(s_ref) and int(zero_point) == int(z_ref)


def test_activation_quantization_of_zeros_is_exact() -> None:
    q, scale, zero_point = quantize_activation(torch.zeros(3, 4))
    q_ref, s_ref, z_ref = dql_reference(np.zeros((3, 4), np.float32))
    assert float(scale) == float(s_ref) == 1.0 and int(zero_point) == int(z_ref) == 0 and q.abs().sum() == 0


def test_per_channel_weights_error_bound_and_range() -> None:
    w = torch.randn(12, 40, generator=torch.Generator().manual_seed(3)) * torch.logspace(-3, 1, 12)[:, None]
    w[5] = 0.0
    q, scale = quantize_per_channel(w)
    assert q.dtype == torch.int8 and scale.shape == (12,)
    err = (w - q.float() * scale[:, None]).abs()
    assert torch.all(err <= scale[:, None] / 2 + 1e-7)
    nonzero = [i for i in range(12) if i != 5]
    assert torch.all(q[nonzero].abs().amax(dim=1) == 127)  # each row's largest weight uses the full grid
    assert scale[5] == 1.0 and q[5].abs().sum() == 0
    q7, _ = quantize_per_channel(w, reduce_range=True)
    assert int(q7.abs().max()) == 63


def test_mlp_torch_and_onnx_runtime_agree_with_fallback() -> None:
    model = mlp()
    q = quantize_dynamic(model, DynamicQuant(fallback=("5",)))
    assert isinstance(q[1], DynamicQuantLinear) and isinstance(q[3], DynamicQuantLinear) and type(q[5]) is nn.Linear
    assert type(model[1]) is nn.Linear  # the caller's model is untouched
    proto = dynamic_onnx_bytes(q, (64,))
    ops = op_types(proto)
    assert ops.count("MatMulInteger") == 2 and ops.count("DynamicQuantizeLinear") == 2 and ops.count("Gemm") == 1  # the fallback stays fp32
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(4))
    got = ort_session(proto).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        expected, fp32 = q(x).numpy(), model(x).numpy()
    assert np.abs(got - expected).max() < 1e-5  # the same integer arithmetic
    assert 1e-4 < np.abs(expected - fp32).max() < 0.05 * np.abs(fp32).max()  # really quantized, and close
    assert (got.argmax(1) == fp32.argmax(1)).mean() >= 0.9


def test_onnx_runtime_fuses_our_pattern_into_integer_kernels(tmp_path) -> None:
    proto = dynamic_onnx_bytes(quantize_dynamic(mlp()), (64,))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(proto, options, providers=["CPUExecutionProvider"])
    fused = op_types(onnx.load(str(tmp_path / "optimized.onnx")))
    assert fused.count("DynamicQuantizeMatMul") + fused.count("MatMulIntegerToFloat") == 3
    assert "MatMulInteger" not in fused and "Cast" not in fused


def test_weights_stored_at_one_byte_each() -> None:
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256)).eval()
    fp32, int8 = onnx_bytes(model, (256,)), dynamic_onnx_bytes(quantize_dynamic(model), (256,))
    weights = 2 * 256 * 256
    assert len(fp32) > 4 * weights and len(int8) < weights + 6 * 1024  # codes + scales, zero points, biases, graph
    assert len(fp32) / len(int8) > 3.5


def test_gemm_and_signed_weights_from_a_plain_onnx_file(tmp_path) -> None:
    model = mlp(seed=5)
    path = tmp_path / "fp32.onnx"
    path.write_bytes(onnx_bytes(model, (64,)))
    report = RewriteReport()
    proto = quantize_onnx_dynamic(path, default_policy(min_elements=1000), weight_type="int8", report=report)
    assert sorted(report.quantized.values()) == ["matmul", "matmul"] and len(report.kept_fp32) == 1  # 32x10 is below min_elements
    weights = [i for i in proto.graph.initializer if i.name.endswith("_quantized")]
    assert {i.data_type for i in weights} == {TensorProto.INT8}
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(6))
    got = ort_session(proto.SerializeToString()).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        fp32 = model(x).numpy()
    cos = (got * fp32).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(fp32, axis=1)
    assert cos.mean() > 0.998 and cos.min() > 0.98 and (got.argmax(1) == fp32.argmax(1)).mean() >= 0.9


def test_embedding_gather_and_matmul_agree_with_torch() -> None:
    model = Tokens().eval()
    q = quantize_dynamic(model)
    assert isinstance(q.embed, DynamicQuantEmbedding) and isinstance(q.proj, DynamicQuantLinear)
    ids = torch.randint(0, 50, (4, 9), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        fp32, expected = model(ids), q(ids)
        rows = q.embed(ids)
    assert torch.all((rows - model.embed(ids)).abs() <= q.embed.scale[ids].unsqueeze(-1) / 2 + 1e-7)

    def export(proxy: nn.Module) -> bytes:
        import io
        import warnings

        buffer = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                proxy, (ids,), buffer, input_names=["ids"], output_names=["y"], dynamic_axes={"ids": {0: "b", 1: "t"}}, dynamo=False
            )
        return buffer.getvalue()

    from deepshrink.compress.quant.onnx_dynamic import dynamic_onnx_from_torch

    proto = dynamic_onnx_from_torch(q, export)
    table = next(i for i in onnx.load_from_string(proto).graph.initializer if i.name.endswith("weight_quantized") and i.dims[0] == 50)
    assert table.data_type == TensorProto.INT8 and list(table.dims) == [50, 16]
    got = ort_session(proto).run(None, {"ids": ids.numpy()})[0]
    assert np.abs(got - expected.numpy()).max() < 1e-5
    assert 0 < (expected - fp32).abs().max() < 0.05


def test_registered_method_and_dequantized_copy() -> None:
    model = mlp()
    q = apply_method(model, DynamicQuant(embeddings=False, scope=Scope(types=("Linear",), exclude="^1$")))
    assert type(q[1]) is nn.Linear and isinstance(q[3], DynamicQuantLinear)
    proxy = dequantized_copy(q)
    assert type(proxy[3]) is nn.Linear and torch.equal(proxy[3].weight, q[3].qweight.float() * q[3].scale[:, None])


def test_bad_inputs_raise_input_error(tmp_path) -> None:
    with pytest.raises(InputError, match="Linear layers only"):
        DynamicQuant(scope=Scope(types=("Conv2d", "Linear")))
    with pytest.raises(InputError, match="no layer named 'nope'"):
        quantize_dynamic(mlp(), DynamicQuant(fallback=("nope",)))
    with pytest.raises(InputError, match="2-d weight"):
        quantize_per_channel(torch.ones(3))
    with pytest.raises(InputError, match="no dynamically quantized layers"):
        dynamic_onnx_bytes(mlp(), (64,))
    with pytest.raises(InputError, match="weight_type"):
        quantize_onnx_dynamic(onnx_bytes(mlp(), (64,)), weight_type="int4")
    with pytest.raises(InputError, match="no such ONNX file"):
        quantize_onnx_dynamic(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"\xff\x00 not a model")
    with pytest.raises(InputError, match="not a readable ONNX model"):
        quantize_onnx_dynamic(tmp_path / "junk.onnx")
    with pytest.raises(InputError, match="from_dict|unknown key"):
        DynamicQuant.from_dict({"fallbak": []})
