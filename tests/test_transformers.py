"""BERT-like encoders from a BertConfig with random weights: fidelity metrics, ONNX export and ORT,
dynamic int8 (torch vs ORT, size, fallback), head/neuron pruning, distillation, SVD, a tiny task, the CLI."""

import copy
import json

import numpy as np
import onnx
import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

import deepshrink.transformers as dt  # noqa: E402
from deepshrink.cli import main  # noqa: E402
from deepshrink.compress.lowrank.layers import svd_linear  # noqa: E402
from deepshrink.compress.quant.dynamic import DynamicQuant, DynamicQuantEmbedding, DynamicQuantLinear, quantize_dynamic, quantize_layers  # noqa: E402
from deepshrink.core.errors import InputError  # noqa: E402
from deepshrink.core.methods import Context, apply_method  # noqa: E402
from deepshrink.evaluate.accuracy import top1  # noqa: E402
from deepshrink.evaluate.fidelity import fidelity  # noqa: E402
from deepshrink.export import ort_session  # noqa: E402

pytestmark = pytest.mark.unit
WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "sat",
    "ran",
    "on",
    "under",
    "mat",
    "log",
    "quick",
    "slow",
    "red",
    "blue",
    "green",
    "big",
    "small",
    "house",
    "tree",
    "river",
]


@pytest.fixture(scope="module")
def tiny():
    return dt.load_encoder(
        dt.bert_config(vocab_size=1000, hidden_size=64, layers=2, heads=4, intermediate_size=128, max_positions=64), seed=0
    )


@pytest.fixture(scope="module")
def batches():
    return dt.random_token_batches(1000, samples=24, min_len=3, max_len=20, batch_size=8, seed=1)


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def word_tokenizer():
    """A WordLevel tokenizer over a tiny vocabulary, BERT-style special tokens, no download."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]")


# -- fidelity metrics on known values ------------------------------------------------------
def test_cosine_fidelity_and_mean_pool_on_known_vectors() -> None:
    ref = torch.tensor([[1.0, 0.0], [1.0, 1.0], [3.0, 4.0], [2.0, 0.0]])
    cand = torch.tensor([[0.0, 1.0], [2.0, 2.0], [-3.0, -4.0], [1.0, 1.0]])
    fid = fidelity(ref, cand)
    assert fid.samples == 4 and fid.cosine_min == pytest.approx(-1.0)
    assert fid.cosine_mean == pytest.approx((0.0 + 1.0 - 1.0 + 2**-0.5) / 4)
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    assert torch.allclose(dt.mean_pool(hidden, torch.tensor([[1, 1, 0]])), torch.tensor([[2.0, 3.0]]))
    assert top1(torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]]), torch.tensor([1, 1, 1])) == pytest.approx(200 / 3)
    with pytest.raises(InputError):
        fidelity(ref, cand[:3])
    with pytest.raises(InputError):
        dt.mean_pool(hidden, torch.ones(1, 2))


# -- ONNX export ------------------------------------------------------------------------------
def test_fp32_export_runs_in_ort_with_dynamic_batch_and_sequence(tiny, batches) -> None:
    proto = dt.encoder_onnx_bytes(tiny, token_type_ids=True)
    names = [i.name for i in onnx.load_from_string(proto).graph.input]
    assert names == ["input_ids", "attention_mask", "token_type_ids"]
    session = ort_session(proto)
    for batch in batches:  # three batch shapes, padded, none equal to the traced example
        hidden = dt.ort_outputs(session, batch)["last_hidden_state"]
        with torch.no_grad():
            expected = tiny(**batch).last_hidden_state.numpy()
        real = batch["attention_mask"].numpy().astype(bool)
        assert np.abs(hidden - expected)[real].max() < 1e-4
    assert fidelity(dt.pooled_embeddings(tiny, batches), dt.ort_pooled(session, batches)).cosine_min > 0.99999


def test_export_leaves_the_encoder_in_the_callers_mode(tiny) -> None:
    model = copy.deepcopy(tiny).train()
    dt.encoder_onnx_bytes(model)
    assert all(m.training for m in model.modules())
    dt.encoder_onnx_bytes(tiny)
    assert not any(m.training for m in tiny.modules())


# -- dynamic int8 ----------------------------------------------------------------------------
def test_dynamic_int8_torch_and_ort_agree(tiny, batches) -> None:
    q = quantize_dynamic(tiny, DynamicQuant())
    assert isinstance(q.embeddings.word_embeddings, DynamicQuantEmbedding)
    assert isinstance(q.encoder.layer[0].attention.self.query, DynamicQuantLinear)
    proto = dt.encoder_dynamic_onnx(q)
    ops = [n.op_type for n in onnx.load_from_string(proto).graph.node]
    assert ops.count("MatMulInteger") == 12 and ops.count("MatMul") == 4  # 6 Linears per layer; Q.K^T and P.V stay float
    reference, torch_q = dt.pooled_embeddings(tiny, batches), dt.pooled_embeddings(q, batches)
    ort_q = dt.ort_pooled(ort_session(proto), batches)
    assert fidelity(torch_q, ort_q).cosine_min > 0.99999  # the same arithmetic
    assert (torch_q - ort_q).abs().max() < 1e-3
    fid = fidelity(reference, torch_q)
    assert fid.cosine_min > 0.99 and fid.cosine_mean < 1 - 1e-7  # really quantized, still faithful
    assert abs(fidelity(reference, ort_q).cosine_mean - fid.cosine_mean) < 1e-5


def test_dynamic_int8_onnx_is_3_5x_smaller_where_weights_dominate() -> None:
    model = dt.load_encoder(dt.bert_config(vocab_size=4000, hidden_size=128, layers=2, heads=4, intermediate_size=512, max_positions=64))
    fp32 = dt.encoder_onnx_bytes(model)
    int8 = dt.encoder_dynamic_onnx(quantize_dynamic(model, DynamicQuant()))
    assert len(fp32) / len(int8) >= 3.5
    assert len(int8) < params(model) * 1.1  # about one byte per weight


def test_sensitivity_fallback_meets_targets_and_exports(tiny, batches) -> None:
    plain = fidelity(dt.pooled_embeddings(tiny, batches), dt.pooled_embeddings(quantize_dynamic(tiny), batches))
    target = 1 - (1 - plain.cosine_mean) / 4  # demand 4x less damage than quantizing everything
    q, result = dt.quantize_with_fallback(tiny, batches, mean_target=target, min_target=0.9)
    assert result.without_fallback.cosine_mean == pytest.approx(plain.cosine_mean)
    assert result.fidelity.cosine_mean >= target and result.fallback
    reference = dt.pooled_embeddings(tiny, batches)
    for name in result.fallback:  # every fp32 layer is needed: quantizing any one of them misses the target
        assert type(q.get_submodule(name)) in (nn.Linear, nn.Embedding)
        trial = quantize_layers(copy.deepcopy(q), [name])
        assert not fidelity(reference, dt.pooled_embeddings(trial, batches)).meets(target, 0.9)
    proto = dt.encoder_dynamic_onnx(q)
    fp32_linears = sum(isinstance(q.get_submodule(n), nn.Linear) for n in result.fallback)
    ops = [n.op_type for n in onnx.load_from_string(proto).graph.node]
    assert ops.count("MatMulInteger") == 12 - fp32_linears
    ort_fid = fidelity(dt.pooled_embeddings(tiny, batches), dt.ort_pooled(ort_session(proto), batches))
    assert ort_fid.cosine_mean == pytest.approx(result.fidelity.cosine_mean, abs=1e-6)
    again = quantize_dynamic(tiny, result.config)  # the returned config reproduces the model
    assert torch.equal(dt.pooled_embeddings(again, batches), dt.pooled_embeddings(q, batches))


# -- pruning, distillation, SVD ------------------------------------------------------------
def test_head_and_neuron_pruning_30_percent_removes_weights(tiny, batches) -> None:
    pruned = apply_method(tiny, dt.TransformerPrune(heads=0.3, neurons=0.3), Context(batches=batches))
    assert dt.head_counts(tiny) == [4, 4] and dt.head_counts(pruned) == [3, 3]
    assert dt.ffn_sizes(pruned) == [90, 90]
    removed = 2 * (3 * (64 * 16 + 16) + 64 * 16) + 2 * (38 * 64 + 38 + 64 * 38)
    assert params(tiny) - params(pruned) == removed
    fp32, small = dt.encoder_onnx_bytes(tiny), dt.encoder_onnx_bytes(pruned)
    assert len(fp32) - len(small) >= 0.95 * 4 * removed  # fp32 bytes of the removed weights, less some graph noise
    session = ort_session(small)
    torch_p = dt.pooled_embeddings(pruned, batches)
    assert fidelity(torch_p, dt.ort_pooled(session, batches)).cosine_min > 0.99999
    assert fidelity(dt.pooled_embeddings(tiny, batches), torch_p).cosine_mean > 0.95


def test_activation_importance_removes_the_head_that_contributes_nothing(tiny, batches) -> None:
    model = copy.deepcopy(tiny)
    out = model.encoder.layer[1].attention.output.dense
    with torch.no_grad():
        out.weight[:, 32:48] = 0.0  # head 2 of layer 1 writes nothing
    scores = dt.prune.head_scores(model, dt.attention_blocks(model), "activation", batches)
    assert int(scores[1].argmin()) == 2 and float(scores[1][2]) == 0.0
    magnitude = dt.prune.head_scores(model, dt.attention_blocks(model), "magnitude", None)
    assert int(magnitude[1].argmin()) == 2
    before = dt.pooled_embeddings(model, batches)
    dt.prune_transformer(model, dt.TransformerPrune(heads=0.25), batches)
    assert dt.head_counts(model) == [3, 3]
    assert torch.allclose(dt.pooled_embeddings(model, batches)[:, :], before, atol=0.05)
    assert fidelity(before, dt.pooled_embeddings(model, batches)).cosine_mean > 0.99


def test_distillation_repairs_pruning(tiny, batches) -> None:
    cfg = dt.TransformerPrune(heads=0.5, neurons=0.5, importance="magnitude")
    plain = apply_method(tiny, cfg)
    repaired = apply_method(
        tiny,
        dt.TransformerPrune(heads=0.5, neurons=0.5, importance="magnitude", distill=dt.TransformerDistill(steps=30, lr=1e-3)),
        Context(batches=batches),
    )
    reference = dt.pooled_embeddings(tiny, batches)
    before, after = (
        fidelity(reference, dt.pooled_embeddings(plain, batches)),
        fidelity(reference, dt.pooled_embeddings(repaired, batches)),
    )
    assert after.cosine_mean > before.cosine_mean and (1 - after.cosine_mean) < 0.7 * (1 - before.cosine_mean)
    assert params(repaired) == params(plain)


def test_svd_of_ffn_projections(tiny, batches) -> None:
    layer = tiny.encoder.layer[0].intermediate.dense
    low = svd_linear(layer, 16)
    s = torch.linalg.svdvals(layer.weight.detach().double())
    approx = (low[1].weight @ low[0].weight).double()
    assert torch.linalg.matrix_norm(layer.weight.double() - approx).item() == pytest.approx(float(s[16:].pow(2).sum().sqrt()), rel=1e-4)
    model, ranks = dt.decompose_transformer(copy.deepcopy(tiny), dt.TransformerSVD(rank_fraction=0.25))
    assert set(ranks.values()) == {16} and len(ranks) == 4
    assert params(tiny) - params(model) == 4 * (64 * 128 - 16 * (64 + 128))
    session = ort_session(dt.encoder_onnx_bytes(model))
    torch_s = dt.pooled_embeddings(model, batches)
    assert fidelity(torch_s, dt.ort_pooled(session, batches)).cosine_min > 0.99999
    _, full = dt.decompose_transformer(copy.deepcopy(tiny), dt.TransformerSVD(rank_fraction=1.0, targets=("attention",)))
    assert set(full.values()) == {None}  # full rank saves nothing: left alone


# -- a tiny task with labels -----------------------------------------------------------------
def test_classification_task_accuracy_survives_int8_and_ort() -> None:
    tokenizer = word_tokenizer()
    g = torch.Generator().manual_seed(3)
    animals, colours = ["cat", "dog"], ["red", "blue", "green"]
    texts, labels = [], []
    for i in range(64):  # label: does the sentence mention an animal?
        words = [WORDS[int(j)] for j in torch.randint(9, len(WORDS), (int(torch.randint(3, 8, (1,), generator=g)),), generator=g)]
        words = [w for w in words if w not in animals]
        if i % 2:
            words.insert(int(torch.randint(0, len(words) + 1, (1,), generator=g)), animals[i % 4 // 2])
        else:
            words.append(colours[i % 3])
        texts.append(" ".join(words))
        labels.append(i % 2)
    labels = torch.tensor(labels)
    batches = dt.tokenize(texts, tokenizer, batch_size=16)
    model = dt.load_encoder(
        dt.bert_config(vocab_size=64, hidden_size=32, layers=1, heads=2, intermediate_size=64, max_positions=32), num_labels=2
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    model.train()
    for step in range(60):
        i = step % len(batches)
        loss = nn.functional.cross_entropy(model(**batches[i]).logits, labels[16 * i : 16 * i + 16])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    fp32 = dt.task_accuracy(model, batches, labels)
    q = quantize_dynamic(model, DynamicQuant())
    int8 = dt.task_accuracy(q, batches, labels)
    ort_logits = dt.ort_logits(ort_session(dt.encoder_dynamic_onnx(q)), batches)
    assert fp32 >= 95 and int8 >= fp32 - 5
    assert top1(ort_logits, labels) == pytest.approx(int8, abs=100 / 64 + 1e-9)


# -- input checks and the CLI -----------------------------------------------------------------
def test_bad_inputs_raise_input_error(tmp_path, tiny, batches) -> None:
    with pytest.raises(InputError, match="no such model directory"):
        dt.load_encoder(tmp_path / "missing")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        dt.load_encoder(tmp_path / "config.json")
    with pytest.raises(InputError, match="must be equal 2-d shapes"):
        dt.check_batches([{"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 4)}])
    with pytest.raises(InputError, match=r"ids must be in \[0, 1000\)"):
        dt.check_batches([{"input_ids": torch.full((1, 3), 1000), "attention_mask": torch.ones(1, 3)}], vocab_size=1000)
    with pytest.raises(InputError, match="heads must be in"):
        dt.TransformerPrune(heads=1.0)
    with pytest.raises(InputError, match="needs token batches"):
        dt.prune_transformer(copy.deepcopy(tiny), dt.TransformerPrune(heads=0.3))
    with pytest.raises(InputError, match="no BERT-style"):
        dt.prune_transformer(nn.Sequential(nn.Linear(4, 4)), dt.TransformerPrune(neurons=0.3, importance="magnitude"))
    with pytest.raises(InputError, match="min_len"):
        dt.random_token_batches(1000, min_len=5, max_len=2)
    with pytest.raises(InputError, match="no texts"):
        (tmp_path / "empty.txt").write_text("\n \n")
        dt.read_texts(tmp_path / "empty.txt")


def test_cli_prunes_and_quantizes_from_a_config(tmp_path, capsys) -> None:
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(dt.bert_config(vocab_size=64, hidden_size=64, layers=2, heads=4, intermediate_size=128, max_positions=32).to_dict())
    )
    word_tokenizer().backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(" ".join(WORDS[i : i + 3 + i % 5]) for i in range(12)))
    out = tmp_path / "run"
    argv = ["transformer", str(config), "--quantize", "dynamic-int8", "--prune-heads", "0.3", "--prune-neurons", "0.3"]
    code = main([*argv, "--texts", str(texts), "--tokenizer", str(tmp_path / "tokenizer.json"), "--out", str(out), "--repeats", "2"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads((out / "report.json").read_text())
    before, after = report["before"], report["after"]
    assert before["params"] == params(dt.load_encoder(config))
    removed = 2 * (3 * (64 * 16 + 16) + 64 * 16) + 2 * (38 * 64 + 38 + 64 * 38)  # one head of four, 38 of 128 neurons, per layer
    assert before["params"] - after["params"] == removed
    assert before["onnx_bytes"] / after["onnx_bytes"] > 2.5  # a tiny model: the graph itself is a good part of the file
    assert after["cosine_mean_ort"] == pytest.approx(after["cosine_mean"], abs=1e-5)
    assert report["stages"]["quantize"]["fidelity"]["samples"] == 12
    assert (out / "compressed.onnx").stat().st_size == after["onnx_bytes"]
    assert main(["transformer", str(config), "--out", str(out)]) == 2
    assert "nothing to do" in capsys.readouterr().err
