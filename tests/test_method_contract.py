"""The contract every registered method keeps (timm style: parametrized over the registry).

For each registration: its config round-trips through ``to_dict``/``from_dict``;
applying it leaves the caller's model untouched (state dict equal before and
after); the result exports to ONNX and ONNX Runtime agrees with PyTorch (fp32:
max abs diff < 1e-4; quantized: the same top-1 class on at least 95% of 64
images and max abs diff < 1e-2, one activation step or so); restoring it after a resume rebuilds the same structure, and the same
weights once the checkpoint is loaded. An output step (pack, export) instead
writes files that decode to the model and agree in ONNX Runtime. A method with
an ONNX backend also runs on the exported graph without touching it.

The cases are enumerated from the registry, so a new registration without a
case here fails ``test_every_registration_has_a_contract_case``.

Budget: tiny models (a 2-conv net on 28x28, a 2-layer 64-wide BERT), 64
training and 64 test images, one epoch where a method trains: about 30 s on one CPU thread.
"""

import copy
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import deepshrink.onnx_in.pipeline  # noqa: F401  (attaches the ONNX backends)
import deepshrink.pipeline.recipe  # noqa: F401  (imports every method family)
from deepshrink.compress.distill import Distill
from deepshrink.compress.lowrank import Decompose
from deepshrink.compress.prune import ChannelPrune, LotteryTicket, MagnitudePrune, NMPrune, Regularize
from deepshrink.compress.quant import PTQ, QAT, DynamicQuant, MixedPrecision
from deepshrink.compress.quant.blockwise4 import Blockwise4
from deepshrink.compress.share import HashShare, KMeansShare
from deepshrink.compress.structure import FoldBN, Separable, fold_batchnorm
from deepshrink.core.config import Config, Scope
from deepshrink.core.errors import InputError
from deepshrink.core.methods import Context, Method, apply_method, registration, registrations, write_output
from deepshrink.data.datasets import DataBundle, ImageSet
from deepshrink.encode.step import Pack
from deepshrink.evaluate.accuracy import evaluate_accuracy
from deepshrink.evaluate.fidelity import fidelity
from deepshrink.export.onnx import onnx_bytes, ort_session, run_ort
from deepshrink.models.weights import save_weights
from deepshrink.onnx_in.data import NpzInputs
from deepshrink.pipeline.steps import Export, Finetune, Student, checkpoint_metadata, model_onnx_bytes, restore_step
from deepshrink.train import TrainConfig
from deepshrink.transformers import TransformerPrune, TransformerSVD  # configs only: no transformers import

pytestmark = pytest.mark.unit
SHAPE = (1, 28, 28)
TRAIN = TrainConfig(epochs=1, batch_size=32, lr=0.01, schedule="constant", weight_decay=0.0, channels_last=False)
FP32_TOL = 1e-4
INT8_AGREEMENT = 0.95
INT8_TOL = 1e-2


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(4),
        nn.Flatten(),
        nn.Linear(8 * 7 * 7, 32),
        nn.ReLU(),
        nn.Linear(32, 10),
    )
    with torch.no_grad():  # non-trivial BN statistics, so folding and restoring them is tested
        for bn in (net[1], net[4]):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
    return net.eval()


def tiny_bundle() -> DataBundle:
    g = torch.Generator().manual_seed(3)
    train = ImageSet(torch.randn(64, *SHAPE, generator=g), torch.randint(0, 10, (64,), generator=g))
    test = ImageSet(torch.randn(64, *SHAPE, generator=g), torch.randint(0, 10, (64,), generator=g))
    return DataBundle("random", train, test, test, 10, (0.0,), (1.0,))


@dataclass
class Case:
    """A small model, a config and the context the method needs; ``tokens`` marks a transformer case."""

    model: nn.Module
    config: Config
    ctx: Context
    tokens: bool = False


def image_case(config: Config, **ctx) -> Callable[[], Case]:
    def build() -> Case:
        model = tiny_net()
        return Case(model, config, Context(data=tiny_bundle(), progress=False, teacher=copy.deepcopy(model), **ctx))

    return build


def transformer_case(config: Config) -> Callable[[], Case]:
    def build() -> Case:
        pytest.importorskip("transformers")
        import deepshrink.transformers as dt

        config_ = dt.bert_config(vocab_size=500, hidden_size=64, layers=2, heads=4, intermediate_size=128, max_positions=32)
        model = dt.load_encoder(config_, seed=0)
        batches = dt.random_token_batches(500, samples=16, min_len=3, max_len=12, batch_size=8, seed=1)
        return Case(model, config, Context(progress=False, batches=batches), tokens=True)

    return build


CASES: dict[str, Callable[[], Case]] = {
    "prune": image_case(MagnitudePrune(sparsity=0.5)),
    "channel_prune": image_case(ChannelPrune(ratio=0.5)),
    "nm_prune": image_case(NMPrune(scope=Scope(types=("Linear",)))),
    "lottery": image_case(LotteryTicket(sparsity=0.5, rounds=1, train=TRAIN)),
    "share": image_case(KMeansShare(conv_bits=3, linear_bits=3, iters=5)),
    "hash_share": image_case(HashShare(bucket_fraction=0.25)),
    "quantize": image_case(PTQ(calib_samples=32)),
    "qat": image_case(QAT(calib_samples=32, finetune=TRAIN)),
    "mixed_precision": image_case(MixedPrecision(sensitivity_samples=32, qat=QAT(calib_samples=32, finetune=TRAIN))),
    "dynamic_quant": image_case(DynamicQuant()),
    "weight_int4": image_case(Blockwise4()),
    "distill": image_case(Distill(train=TRAIN)),
    "decompose": image_case(Decompose(method="tucker", rank=2, round_to=1, latency_check=False)),  # forced: tiny layers
    "separable": image_case(Separable()),
    "fold_bn": image_case(FoldBN()),
    "student": image_case(Student(model="lenet_small"), model_name="lenet300"),
    "finetune": image_case(Finetune(train=TRAIN, regularize=Regularize(kind="bn_scale", strength=1e-3))),
    "pack": image_case(Pack()),
    "export": image_case(Export(check_images=16)),
    "transformer_prune": transformer_case(TransformerPrune(heads=0.5, neurons=0.5)),
    "transformer_svd": transformer_case(TransformerSVD(rank_fraction=0.25)),
}
REGISTERED = {record.step: record for record in registrations()}


def test_every_registration_has_a_contract_case():
    assert set(REGISTERED) == set(CASES), f"registered without a contract case: {sorted(set(REGISTERED) - set(CASES))}"


def _case(step: str) -> tuple[Method, Case]:
    case = CASES[step]()
    record = registration(case.config)
    assert record.step == step and record is REGISTERED[step]
    return record, case


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for key in a:
        assert a[key].shape == b[key].shape and torch.equal(a[key], b[key]), key


def _structure(model: nn.Module) -> list[tuple[str, str]]:
    return [(name, type(module).__name__) for name, module in model.named_modules()]


@pytest.mark.parametrize("step", sorted(REGISTERED))
def test_config_round_trips(step):
    config = CASES[step]().config if step in CASES else pytest.fail(f"no contract case for {step}")
    again = type(config).from_dict(config.to_dict())
    assert again == config and again.to_dict() == config.to_dict()


@pytest.mark.parametrize("step", sorted(s for s, r in REGISTERED.items() if r.required()))
def test_a_missing_need_is_one_clear_error(step):
    record, case = _case(step)
    for need in record.required():
        ctx = copy.copy(case.ctx)
        setattr(ctx, need, None)
        with pytest.raises(InputError, match=f"^{step} needs {need}: pass {need}="):
            apply_method(case.model, case.config, ctx)


@pytest.mark.parametrize("step", sorted(s for s, r in REGISTERED.items() if not r.output))
def test_apply_export_and_restore(step, tmp_path):
    record, case = _case(step)
    before = _state(case.model)
    torch.manual_seed(0)
    result = apply_method(case.model, case.config, case.ctx)
    _assert_same_state(before, _state(case.model))  # the caller's model is untouched
    assert result is not case.model
    _assert_ort_agrees(result, case, record.quantizes)
    checkpoint = save_weights(result, tmp_path / "step.safetensors", checkpoint_metadata(result, case.config))
    restored = restore_step(case.model, case.config, case.ctx, checkpoint)
    assert _structure(restored) == _structure(result)
    _assert_same_state(_state(result), _state(restored))


def _assert_ort_agrees(model: nn.Module, case: Case, quantized: bool) -> None:
    model.eval()
    if case.tokens:
        import deepshrink.transformers as dt

        session = ort_session(dt.encoder_dynamic_onnx(model) if quantized else dt.encoder_onnx_bytes(model))
        batches = case.ctx.batches
        assert fidelity(dt.pooled_embeddings(model, batches), dt.ort_pooled(session, batches)).cosine_min > 0.99999
        return
    images = case.ctx.data.test.images
    got = run_ort(ort_session(model_onnx_bytes(model, SHAPE)), images)
    with torch.no_grad():
        expected = model(images).numpy()
    if quantized:
        assert (got.argmax(1) == expected.argmax(1)).mean() >= INT8_AGREEMENT
        assert np.abs(got - expected).max() < INT8_TOL
    else:
        assert np.abs(got - expected).max() < FP32_TOL


@pytest.mark.parametrize("step", sorted(s for s, r in REGISTERED.items() if r.output))
def test_output_step_writes_files_that_agree(step, tmp_path):
    record, case = _case(step)
    assert record.restore is None  # an output step has no checkpoint to resume from
    ctx = copy.copy(case.ctx)
    ctx.out_dir = tmp_path
    before = _state(case.model)
    written = apply_method(case.model, case.config, ctx)
    _assert_same_state(before, _state(case.model))
    assert written.files and all(path.is_file() for path in written.files.values())
    if written.model is not None:  # an archive: it decodes to the model, and its ONNX agrees in ORT
        _assert_same_state(_state(case.model), _state(written.model))
        assert written.export
        written = write_output(written.model, Export(check_images=16), ctx)
    assert written.checks["onnx_max_abs_diff"] < FP32_TOL
    assert written.checks["onnx_top1"] == evaluate_accuracy(case.model, case.ctx.data.test).top1


@pytest.mark.parametrize("step", sorted(s for s, r in REGISTERED.items() if r.onnx is not None))
def test_onnx_backend_leaves_the_graph_and_agrees(step, tmp_path):
    """The ONNX backend works on the exported graph, never modifies it, and means what the torch backend means."""
    record, case = _case(step)
    proto = onnx.load_from_string(onnx_bytes(case.model, SHAPE))
    original = proto.SerializeToString()
    calib = NpzInputs({proto.graph.input[0].name: case.ctx.data.train.images[:32].numpy()})
    result, _ = record.onnx(proto, case.config, Context(progress=False, calib=calib, out_dir=tmp_path))
    assert proto.SerializeToString() == original
    onnx.checker.check_model(result)
    images = case.ctx.data.test.images
    got = run_ort(ort_session(result.SerializeToString()), images)
    if record.output:  # an archive restored from the file: the very same graph
        assert result.SerializeToString() != b"" and np.array_equal(got, run_ort(ort_session(original), images))
        return
    folded = fold_batchnorm(case.model)  # the export folds BatchNorm: the ONNX backend sees the folded weights
    with torch.no_grad():
        reference = apply_method(folded, case.config, case.ctx)(images).numpy()
    if record.quantizes:
        assert (got.argmax(1) == reference.argmax(1)).mean() >= INT8_AGREEMENT
        assert np.abs(got - reference).max() < INT8_TOL
    else:
        assert np.abs(got - reference).max() < FP32_TOL


def test_pack_of_a_quantized_model_stores_its_integers(tmp_path):
    """The pack step's second path: a fake-quant model is archived as bit-packed integers and restored to the same function."""
    case = CASES["quantize"]()
    quantized = apply_method(case.model, case.config, case.ctx)
    ctx = copy.copy(case.ctx)
    ctx.out_dir = tmp_path
    written = apply_method(quantized, Pack(), ctx)
    assert written.files["archive"].name == "model.qpack.safetensors" and written.label == "bit-packed integers"
    assert written.file_bytes == written.files["archive"].stat().st_size < 0.4 * 4 * sum(p.numel() for p in case.model.parameters())
    images = case.ctx.data.test.images
    with torch.no_grad():  # the archive holds the integer codes, not the float shadow weights: same function
        assert torch.equal(written.model(images), quantized(images))
    got = run_ort(ort_session(model_onnx_bytes(written.model, SHAPE)), images)
    with torch.no_grad():
        expected = quantized(images).numpy()
    assert (got.argmax(1) == expected.argmax(1)).mean() >= INT8_AGREEMENT and np.abs(got - expected).max() < INT8_TOL
