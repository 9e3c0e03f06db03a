"""Serving-grade compression of BERT-like encoders on a tiny random config: dynamic int8 that reaches
ONNX Runtime's fused kernels, 4-bit block-wise weights as MatMulNBits, the 4/8/32 ladder, fp16 small
tables, and the retrieval-agreement measure."""

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

pytest.importorskip("transformers")

import deepshrink.compress.quant.onnx_dynamic as onnx_dynamic  # noqa: E402
import deepshrink.transformers as dt  # noqa: E402
from deepshrink.compress.quant.blockwise4 import Blockwise4, blockwise4_layers, quantize_blocks, quantize_blockwise4  # noqa: E402
from deepshrink.compress.quant.dynamic import DynamicQuantLinear, dynamic_quant_layers  # noqa: E402
from deepshrink.compress.quant.half_tables import half_precision_tables  # noqa: E402
from deepshrink.compress.quant.onnx_nbits import pack_nibbles  # noqa: E402
from deepshrink.core.errors import InputError  # noqa: E402
from deepshrink.evaluate.fidelity import fidelity  # noqa: E402
from deepshrink.export import ort_session  # noqa: E402
from deepshrink.transformers.ladder import quantize_with_ladder  # noqa: E402
from deepshrink.transformers.retrieval import neighbour_agreement, python_docs_sentences  # noqa: E402
from deepshrink.transformers.serving import ort_optimized_ops, serving_int4, serving_int8, serving_onnx, serving_quantized_onnx  # noqa: E402

pytestmark = pytest.mark.unit
LINEARS = 12  # 2 layers x (query, key, value, attention output, FFN up, FFN down); the pooler is not in the exported graph


@pytest.fixture(scope="module")
def tiny():
    return dt.load_encoder(dt.bert_config(vocab_size=1000, hidden_size=64, layers=2, heads=4, intermediate_size=128, max_positions=64))


@pytest.fixture(scope="module")
def batches():
    return dt.random_token_batches(1000, samples=24, min_len=3, max_len=20, batch_size=8, seed=1)


def initializer_types(proto: bytes) -> dict[str, int]:
    return {init.name: init.data_type for init in onnx.load_from_string(proto).graph.initializer}


# -- int8 for serving -------------------------------------------------------------------------
@pytest.mark.parametrize("vnni", [True, False])
def test_weight_type_follows_the_cpu(monkeypatch, vnni) -> None:
    monkeypatch.setattr(onnx_dynamic, "cpu_has_vnni", lambda: vnni)
    assert onnx_dynamic.cpu_weight_type() == ("int8" if vnni else "uint8")


@pytest.mark.parametrize("weight_type", ["int8", "uint8"])
def test_serving_int8_reaches_the_fused_kernels_and_matches_torch(tiny, batches, weight_type) -> None:
    q = serving_int8(tiny)
    assert len([n for n, m in dynamic_quant_layers(q).items() if isinstance(m, DynamicQuantLinear) and n.startswith("encoder.")]) == LINEARS
    proto = serving_quantized_onnx(q, weight_type=weight_type)
    ops, fp32_ops = ort_optimized_ops(proto), ort_optimized_ops(serving_onnx(tiny))
    assert ops.get("DynamicQuantizeMatMul", 0) + ops.get("MatMulIntegerToFloat", 0) == LINEARS  # every projection fused
    assert ops.get("MatMulInteger", 0) == 0 and ops.get("MatMul", 0) + ops.get("FusedMatMul", 0) == 4  # only Q.K^T and P.V stay float
    for fused in ("LayerNormalization", "SkipLayerNormalization", "Attention", "BiasGelu", "Gelu"):  # whatever fp32 fuses, int8 fuses too
        assert ops.get(fused, 0) + (ops.get("Gelu", 0) if fused == "BiasGelu" else 0) >= fp32_ops.get(fused, 0), fused
    assert "IsNaN" not in ops and "IsNaN" not in fp32_ops  # eager attention: no NaN clean-up pass over the attention matrix
    types = initializer_types(proto)
    assert types["model.embeddings.position_embeddings.weight"] == TensorProto.FLOAT16
    assert types["model.embeddings.token_type_embeddings.weight"] == TensorProto.FLOAT16
    codes = [t for name, t in types.items() if name.endswith("_quantized")]
    assert codes.count(TensorProto.INT8 if weight_type == "int8" else TensorProto.UINT8) >= LINEARS
    torch_q, ort_q = dt.pooled_embeddings(q, batches), dt.ort_pooled(ort_session(proto), batches)
    assert fidelity(torch_q, ort_q, agreement=False).cosine_min > 0.99999
    fid = fidelity(dt.pooled_embeddings(tiny, batches), ort_q, agreement=False)
    assert fid.cosine_min > 0.99 and fid.cosine_mean < 1 - 1e-7


def test_half_precision_tables_only_rewrites_exact_tables() -> None:
    exact = np.arange(12, dtype=np.float32).reshape(4, 3) / 4  # exact in fp16
    inexact = exact + np.float32(1e-4)
    nodes = [helper.make_node("Gather", [t, "ids"], [f"{t}_out"], axis=0) for t in ("exact", "inexact")]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info(f"{t}_out", TensorProto.FLOAT, [2, 3]) for t in ("exact", "inexact")],
        [numpy_helper.from_array(exact, "exact"), numpy_helper.from_array(inexact, "inexact")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert half_precision_tables(proto) == ["exact"]
    ids = np.array([3, 1], dtype=np.int64)
    out = ort_session(proto.SerializeToString()).run(None, {"ids": ids})
    assert np.array_equal(out[0], exact[ids]) and np.array_equal(out[1], inexact[ids])


# -- 4-bit weights -----------------------------------------------------------------------------
@pytest.mark.parametrize("symmetric", [True, False])
def test_blockwise4_error_is_at_most_half_a_step(symmetric) -> None:
    w = torch.randn(16, 100) * torch.linspace(0.1, 3, 100)  # in_features not a multiple of the block
    blocks = quantize_blocks(w, 32, symmetric)
    assert blocks.codes.shape == (16, 4, 32) and int(blocks.codes.max()) <= 15
    error = (blocks.dequantized() - w).abs().reshape(16, -1)
    step = blocks.scale.repeat_interleave(32, dim=1)[:, :100]
    assert bool((error <= step / 2 + 1e-6).all())
    searched = quantize_blocks(w, 32, symmetric, search=True)
    assert (searched.dequantized() - w).pow(2).sum() <= (blocks.dequantized() - w).pow(2).sum()


def test_pack_nibbles_low_first() -> None:
    assert pack_nibbles(np.array([[1, 2, 15]])).tolist() == [[0x21, 0x0F]]


@pytest.mark.parametrize(("block_size", "symmetric"), [(32, True), (64, False), (128, True)])
def test_blockwise4_onnx_is_matmul_nbits_agrees_with_torch_and_is_4_bits_a_weight(tiny, batches, block_size, symmetric) -> None:
    q = serving_int4(tiny, Blockwise4(block_size=block_size, symmetric=symmetric))
    layers = {n: m for n, m in blockwise4_layers(q).items() if n.startswith("encoder.")}
    assert len(layers) == LINEARS
    proto = serving_quantized_onnx(q)
    graph = onnx.load_from_string(proto).graph
    assert [n.op_type for n in graph.node].count("MatMulNBits") == LINEARS
    assert not any(n.op_type in ("MatMulInteger", "DynamicQuantizeLinear") for n in graph.node)
    torch_q, ort_q = dt.pooled_embeddings(q, batches), dt.ort_pooled(ort_session(proto), batches)
    assert (torch_q - ort_q).abs().max() < 1e-4  # the same weights, fp32 activations
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    nbits = sum(a.nbytes for name, a in inits.items() if name.endswith(("_Q4", "_scales", "_zero_points")))
    expected = 0  # per output channel: half a byte per (padded) weight, a 4-byte scale and, asymmetric, half a byte of zero point per block
    for m in layers.values():
        blocks = -(-m.in_features // block_size)
        expected += m.out_features * (blocks * block_size // 2 + 4 * blocks + (0 if symmetric else -(-blocks // 2)))
    assert nbits == expected
    if block_size == 32:  # no padding: 4 bits a weight plus one scale per 32 weights
        weights = sum(m.in_features * m.out_features for m in layers.values())
        assert nbits == weights * (4 + 32 / 32) / 8
    assert fidelity(dt.pooled_embeddings(tiny, batches), ort_q, agreement=False).cosine_min > 0.99


def test_blockwise4_rejects_odd_block_and_unknown_fallback(tiny) -> None:
    with pytest.raises(InputError, match="block_size"):
        Blockwise4(block_size=48)
    with pytest.raises(InputError, match="no layer named"):
        quantize_blockwise4(tiny, Blockwise4(fallback=("nope",)))


def test_ladder_climbs_to_meet_a_strict_target_and_exports_each_rung(tiny, batches) -> None:
    reference = dt.pooled_embeddings(tiny, batches)
    all4 = fidelity(reference, dt.pooled_embeddings(quantize_blockwise4(tiny), batches), agreement=False)
    target = 1 - (1 - all4.cosine_mean) / 20  # 20x less damage than all 4-bit
    q, result = quantize_with_ladder(tiny, batches, mean_target=target, min_target=0.0)
    counts = result.counts()
    assert counts["int8"] + counts["fp32"] > 0 and sum(counts.values()) == LINEARS + 1  # and the pooler
    assert result.fidelity.cosine_mean >= target - 1e-4  # measured on the final model (int8 vocabulary, fp16 tables)
    ops = [n.op_type for n in onnx.load_from_string(serving_quantized_onnx(q)).graph.node]
    assert result.levels["pooler.dense"] == "int4"  # it cannot change the pooled embeddings
    assert ops.count("MatMulNBits") == counts["int4"] - 1
    assert ops.count("MatMulInteger") == counts["int8"]


# -- retrieval agreement -------------------------------------------------------------------------
def test_neighbour_agreement_is_one_for_the_same_embeddings_and_drops_when_they_move() -> None:
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(300, 16, generator=g)
    same = neighbour_agreement(emb, emb.clone(), queries=50, k=10)
    assert same.mean == 1.0 and same.min == 1.0
    moved = neighbour_agreement(emb, emb + 0.5 * torch.randn(300, 16, generator=g), queries=50, k=10)
    assert moved.mean < 0.9
    unrelated = neighbour_agreement(emb, torch.randn(300, 16, generator=g), queries=50, k=10)
    assert unrelated.mean < 0.15  # chance is 10/299
    with pytest.raises(InputError):
        neighbour_agreement(emb, emb[:10])


def test_python_docs_corpus_ships_over_a_thousand_unique_sentences() -> None:
    sentences = python_docs_sentences()
    assert len(sentences) >= 1000 and len(set(sentences)) == len(sentences)
    assert all(s[0].isupper() and s[-1] in ".!?" and 6 <= len(s.split()) <= 48 for s in sentences)
