"""ONNX-in fidelity on every output (issue 21): a BERT-like ONNX file that also returns its
input ids and attention mask must not be reported as perfectly faithful when it is broken."""

import json

import numpy as np
import onnx
import pytest
import torch
from torch import nn

pytest.importorskip("transformers")
from transformers import BertConfig, BertModel  # noqa: E402

from deepshrink.cli import main  # noqa: E402
from deepshrink.compress.prune.unstructured import MagnitudePrune  # noqa: E402
from deepshrink.compress.quant.config import PTQ  # noqa: E402
from deepshrink.core.errors import InputError  # noqa: E402
from deepshrink.evaluate.fidelity import cosines  # noqa: E402
from deepshrink.onnx_in import compress_onnx, evaluate_onnx, load_onnx, read_npz  # noqa: E402
from deepshrink.onnx_in.outputs import constant_outputs  # noqa: E402
from deepshrink.onnx_in.runtime import all_outputs  # noqa: E402
from deepshrink.pipeline.recipe import Recipe  # noqa: E402

pytestmark = pytest.mark.unit
OUTPUTS = ["ids_out", "mask_out", "last_hidden_state", "pooler_output"]
REAL = ["last_hidden_state", "pooler_output"]


class SentenceEncoder(nn.Module):
    """A model-zoo style export: the inputs come back out next to the hidden states and the pooled vector."""

    def __init__(self, bert: BertModel) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask)
        return input_ids, attention_mask, out.last_hidden_state, out.pooler_output


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=200, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, max_position_embeddings=32
    )
    model = SentenceEncoder(BertModel(config).eval()).eval()
    ids = torch.randint(5, 200, (48, 16))
    mask = torch.ones_like(ids)
    mask[::2, 11:] = 0  # every other sequence padded
    folder = tmp_path_factory.mktemp("bert")
    path, npz = folder / "encoder.onnx", folder / "tokens.npz"
    batch = {0: "batch"}
    torch.onnx.export(
        model,
        (ids[:2], mask[:2]),
        str(path),
        input_names=["input_ids", "attention_mask"],
        output_names=OUTPUTS,
        dynamic_axes={name: batch for name in ["input_ids", "attention_mask", *OUTPUTS]},
        opset_version=17,
        dynamo=False,
    )
    np.savez(npz, input_ids=ids.numpy(), attention_mask=mask.numpy())
    return path, npz


def measured_cosine_means(original, compressed, npz) -> dict[str, float]:
    """An independent measurement of the same files: ORT on both, per-sample cosine per output."""
    model = load_onnx(original)
    data = read_npz(npz, model)
    before, after = all_outputs(model, data), all_outputs(load_onnx(compressed), data)
    return {name: float(cosines(before[name], after[name]).mean()) for name in REAL}


def test_pass_through_outputs_are_detected(encoder):
    model = onnx.load(str(encoder[0]))
    assert [o.name for o in model.graph.output] == OUTPUTS
    assert constant_outputs(model) == {"ids_out": "input passed through", "mask_out": "input passed through"}


def test_a_broken_model_is_not_reported_faithful(encoder, tmp_path):
    path, npz = encoder
    recipe = Recipe("break", (("prune", MagnitudePrune(sparsity=0.9)),))
    report = compress_onnx(path, recipe, tmp_path / "run", npz=npz, progress=False)
    stage = report["stages"][-1]
    rows = {o["name"]: o for o in stage["outputs"]}
    assert rows["ids_out"]["constant"] == rows["mask_out"]["constant"] == "input passed through"
    assert rows["ids_out"]["identical"] and rows["ids_out"]["fidelity"] is None  # unchanged, and not counted
    measured = measured_cosine_means(path, tmp_path / "run" / "model.onnx", npz)
    worst = min(measured, key=measured.get)
    assert stage["fidelity_output"] == worst
    assert stage["fidelity"]["cosine_mean"] == pytest.approx(measured[worst], abs=1e-9)
    assert stage["fidelity"]["cosine_mean"] < 0.9  # broken, and the report says so
    for name in REAL:
        assert rows[name]["fidelity"]["cosine_mean"] == pytest.approx(measured[name], abs=1e-9)
    assert stage["top1"] is None and stage["fidelity"]["top1_agreement"] is None  # no labels, no logits
    markdown = (tmp_path / "run" / "report.md").read_text()
    assert "`ids_out` (input passed through)" in markdown and "pooler_output" in markdown


def test_a_faithful_model_and_a_named_output(encoder, tmp_path):
    path, npz = encoder
    recipe = Recipe("int8", (("quantize", PTQ(activation_bits=None)),))
    report = compress_onnx(path, recipe, tmp_path / "q", npz=npz, progress=False, output="pooler_output")
    stage = report["stages"][-1]
    assert stage["fidelity_output"] == "pooler_output" and report["outputs"]["fidelity_output"] == "pooler_output"
    measured = measured_cosine_means(path, tmp_path / "q" / "model.onnx", npz)
    assert stage["fidelity"]["cosine_mean"] == pytest.approx(measured["pooler_output"], abs=1e-9)
    assert 0.99 < stage["fidelity"]["cosine_mean"] < 1.0  # really quantized, still faithful
    with pytest.raises(InputError, match="does not depend on the weights"):
        compress_onnx(path, recipe, tmp_path / "bad", npz=npz, progress=False, output="ids_out")
    with pytest.raises(InputError, match="the model's outputs are"):
        compress_onnx(path, recipe, tmp_path / "bad", npz=npz, progress=False, output="logits")


def test_onnx_eval_compares_every_output(encoder, tmp_path, capsys):
    path, npz = encoder
    compress_onnx(path, Recipe("break", (("prune", MagnitudePrune(sparsity=0.9)),)), tmp_path / "run", npz=npz, progress=False)
    broken = tmp_path / "run" / "model.onnx"
    result = evaluate_onnx(broken, npz, reference=path)
    measured = measured_cosine_means(path, broken, npz)
    assert result["fidelity"]["cosine_mean"] == pytest.approx(min(measured.values()), abs=1e-9)
    assert "top1" not in result
    assert main(["onnx-eval", str(broken), "--npz", str(npz), "--reference", str(path), "--output", "pooler_output", "--json"]) == 0
    named = json.loads(capsys.readouterr().out)
    assert named["fidelity_output"] == "pooler_output"
    assert named["fidelity"]["cosine_mean"] == pytest.approx(measured["pooler_output"], abs=1e-9)
