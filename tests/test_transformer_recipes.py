"""The shipped transformer recipes on a Hugging Face model directory (a tiny random BERT saved with
``save_pretrained`` and a word-level tokenizer): ``deepshrink compress <dir> --recipe transformer-int8``
writes an ONNX file with ORT's dynamic int8 (or 4-bit MatMulNBits) ops that agrees with the torch model
the recipe built, and a report whose fidelity is what a measurement of that file gives."""

import json
import random

import onnx
import pytest

pytest.importorskip("transformers")

import deepshrink.transformers as dt  # noqa: E402
from deepshrink.cli import main  # noqa: E402
from deepshrink.commands.compress_transformer import apply_steps  # noqa: E402
from deepshrink.evaluate.fidelity import fidelity  # noqa: E402
from deepshrink.export import ort_session  # noqa: E402
from deepshrink.pipeline.recipe import load_recipe  # noqa: E402

pytestmark = pytest.mark.unit
WORDS = [f"w{i}" for i in range(60)]
ORT_VS_TORCH_COSINE = 0.9999  # the file computes what the torch model computes, up to float summation order
INT8_OPS = {"DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulInteger"}


def write_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.save(str(path))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    config = dt.bert_config(vocab_size=64, hidden_size=64, layers=2, heads=2, intermediate_size=128, max_positions=32)
    dt.load_encoder(config, seed=0).save_pretrained(str(root / "model"), safe_serialization=True)
    write_tokenizer(root / "model" / "tokenizer.json")
    rng = random.Random(0)
    (root / "texts.txt").write_text("\n".join(" ".join(rng.choices(WORDS, k=rng.randint(4, 20))) for _ in range(24)) + "\n")
    return root


def compress(model_dir, out, recipe: str, *extra) -> int:
    args = ["compress", str(model_dir / "model"), "--recipe", recipe, "--texts", str(model_dir / "texts.txt")]
    return main([*args, "--out", str(out), "--repeats", "1", "--threads", "1", "--batch-size", "8", *extra])


@pytest.mark.parametrize("recipe, ops", [("transformer-int8", INT8_OPS), ("transformer-int4", {"MatMulNBits"})])
def test_recipe_on_a_model_dir_writes_a_quantized_onnx_that_agrees(model_dir, tmp_path, capsys, recipe, ops):
    out = tmp_path / "run"
    assert compress(model_dir, out, recipe) == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "report.json", "report.md"]
    proto = onnx.load(str(out / "model.onnx"))
    assert ops & {node.op_type for node in proto.graph.node}

    original = dt.load_encoder(model_dir / "model")
    tokenizer = dt.load_tokenizer(model_dir / "model" / "tokenizer.json")
    batches = dt.tokenize(dt.read_texts(model_dir / "texts.txt"), tokenizer, 8, 64)
    compressed = apply_steps(original, load_recipe(recipe), batches)
    session = ort_session(proto.SerializeToString(), 1)
    from_file = dt.ort_pooled(session, batches)
    assert fidelity(dt.pooled_embeddings(compressed, batches), from_file, agreement=False).cosine_min > ORT_VS_TORCH_COSINE

    report = json.loads((out / "report.json").read_text())
    measured = fidelity(dt.pooled_embeddings(original, batches), from_file, agreement=False)
    assert report["after"]["cosine_mean_ort"] == pytest.approx(measured.cosine_mean, abs=1e-6)  # the report claims what the file does
    assert report["after"]["cosine_min_ort"] == pytest.approx(measured.cosine_min, abs=1e-6)
    assert report["after"]["onnx_bytes"] == (out / "model.onnx").stat().st_size < report["before"]["onnx_bytes"] / 2


def run_bad(capsys, out, code: int) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert not out.exists()  # nothing partial
    assert len(err.splitlines()) == 1
    return err


def test_a_step_without_a_transformer_form_is_one_line(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    err = run_bad(capsys, out, compress(model_dir, out, "int8-ptq"))
    assert "steps[0].quantize does not run on a transformer" in err


def test_a_directory_without_weights_is_one_line(model_dir, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((model_dir / "model" / "config.json").read_text())
    out = tmp_path / "run"
    code = main(["compress", str(bare), "--recipe", "transformer-int8", "--out", str(out)])
    assert "weights" in run_bad(capsys, out, code)


def test_an_empty_texts_file_is_one_line(model_dir, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    out = tmp_path / "run"
    code = main(["compress", str(model_dir / "model"), "--recipe", "transformer-int8", "--texts", str(empty), "--out", str(out)])
    assert "no texts" in run_bad(capsys, out, code)


@pytest.mark.parametrize("recipe, ops", [("transformer-int8", INT8_OPS), ("transformer-int4", {"MatMulNBits"})])
def test_recipe_on_an_onnx_encoder(tmp_path, capsys, recipe, ops):
    """The same recipes on an ONNX file of the encoder (ONNX-in): quantized ops, and the file stays close to the fp32 graph."""
    import numpy as np

    config = dt.bert_config(vocab_size=64, hidden_size=64, layers=2, heads=2, intermediate_size=128, max_positions=32)
    source = tmp_path / "encoder.onnx"
    source.write_bytes(dt.encoder_onnx_bytes(dt.load_encoder(config, seed=0)))
    batch = {k: v.numpy() for k, v in dt.random_token_batches(64, 32, 4, 16, batch_size=32, seed=1)[0].items()}
    np.savez(tmp_path / "tokens.npz", **batch)
    out = tmp_path / "run"
    code = main(["compress", str(source), "--recipe", recipe, "--npz", str(tmp_path / "tokens.npz"), "--out", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    quantized = onnx.load(str(out / "model.onnx"))
    assert ops & {node.op_type for node in quantized.graph.node}
    got = ort_session(quantized.SerializeToString(), 1).run(None, batch)[0]
    expected = ort_session(source.read_bytes(), 1).run(None, batch)[0]
    mask = batch["attention_mask"].astype(bool)
    a, b = got[mask], expected[mask]  # every real token's hidden state
    cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cosine.min() > 0.999
    stage = json.loads((out / "report.json").read_text())["stages"][-1]
    assert stage["onnx_bytes"] == (out / "model.onnx").stat().st_size < source.stat().st_size / 2
