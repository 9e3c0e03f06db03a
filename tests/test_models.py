"""The model zoo, its registry, safetensors weights, user models and pretrained verification."""

import inspect
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import deepshrink.models as models
from deepshrink.core.errors import InputError, WeightsError
from deepshrink.core.registry import Registry
from deepshrink.export import onnx_bytes, ort_session, run_ort, verify_onnx
from deepshrink.models import MODELS, create_model, list_models, load_user_model, load_weights, resolve_model, save_weights
from deepshrink.models.weights import sha256_of

pytestmark = pytest.mark.unit

ZOO = list_models()
EXPECTED_ZOO = {"lenet300", "lenet5", "lenet5_caffe", "resnet20", "vgg", "mobilenetv2"}


def build(name: str, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return create_model(name, **kwargs)


def test_zoo_contents():
    assert set(ZOO) >= EXPECTED_ZOO


@pytest.mark.parametrize("name", ZOO)
def test_forward_backward(name):
    model = build(name).train()
    x = torch.randn(2, 1, 28, 28)
    out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    out.logsumexp(1).sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{pname} has non-finite gradient"
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("name", ZOO)
def test_cifar_shape_and_classes(name):
    kwargs = {"in_channels": 3, "num_classes": 7}
    if "input_size" in inspect.signature(MODELS.get(name)).parameters:
        kwargs["input_size"] = 32
    model = build(name, **kwargs)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7)


@pytest.mark.parametrize("name", ZOO)
def test_parameter_budget_and_eval_mode(name):
    model = build(name)
    assert not model.training, "create_model returns the model in eval mode"
    assert sum(p.numel() for p in model.parameters()) <= 2_500_000


def test_lenet5_caffe_matches_deep_compression_size():
    # conv 20x1x5x5+20, conv 50x20x5x5+50, fc 500x800+500, fc 10x500+10
    assert sum(p.numel() for p in build("lenet5_caffe").parameters()) == 431_080
    assert sum(p.numel() for p in build("lenet300").parameters()) == 784 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10


def calibrate_bn(model: nn.Module) -> nn.Module:
    """Set BatchNorm running stats to real batch stats, so eval-mode activations do not vanish."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = 1.0
    with torch.no_grad():
        model.train()(torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(0)))
    return model.eval()


@pytest.mark.parametrize("name", ZOO)
def test_onnx_matches_torch(name):
    model = calibrate_bn(build(name))
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert model(x).std(0).max() > 1e-3, "inputs must give distinguishable outputs for the comparison to mean anything"
    session = ort_session(onnx_bytes(model, (1, 28, 28)))
    assert verify_onnx(model, session, x) < 1e-4
    # verify_onnx must really compare: a perturbed model disagrees.
    with torch.no_grad():
        list(model.parameters())[-1].add_(0.5)  # the classifier bias shifts every logit
    assert verify_onnx(model, session, x) > 1e-3


# --- registry ---------------------------------------------------------------


def test_registry_rejects_duplicates():
    reg: Registry[int] = Registry("thing")
    reg.register("a")(1)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a")(2)
    assert reg.get("a") == 1 and reg.names() == ["a"]
    original = MODELS.get("lenet300")
    with pytest.raises(ValueError, match="lenet300"):
        MODELS.register("lenet300")(lambda **kw: nn.Identity())
    assert MODELS.get("lenet300") is original


def test_unknown_model_lists_known_names():
    with pytest.raises(InputError, match="unknown model 'resnet9000'") as info:
        create_model("resnet9000")
    for name in ZOO:
        assert name in str(info.value)


# --- weights ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["lenet5", "resnet20"])
def test_save_load_roundtrip(tmp_path, name):
    src, dst = build(name, seed=1), build(name, seed=2)
    if name == "resnet20":  # make BN running stats non-trivial
        src.train()(torch.randn(4, 1, 28, 28))
    path = save_weights(src, tmp_path / "sub" / "w.safetensors", metadata={"k": "v"})
    assert path.is_file() and not list(path.parent.glob("*.tmp"))
    assert not all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values(), strict=True))
    load_weights(dst, path)
    for (ka, a), (kb, b) in zip(src.state_dict().items(), dst.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(a, b), ka


def test_load_other_architecture_fails(tmp_path):
    path = save_weights(build("lenet5"), tmp_path / "lenet5.safetensors")
    with pytest.raises(WeightsError, match="do not match"):
        load_weights(build("lenet300"), path)
    # Same layer names, different shapes.
    path = save_weights(build("lenet5", num_classes=7), tmp_path / "lenet5_7.safetensors")
    with pytest.raises(WeightsError, match="lenet5_7.safetensors"):
        load_weights(build("lenet5"), path)


def test_nan_weights_rejected(tmp_path):
    model = build("lenet5")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["0.weight"][0, 0, 0, 0] = float("nan")
    save_file(state, str(tmp_path / "nan.safetensors"))
    target = build("lenet5", seed=3)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(WeightsError, match="NaN"):
        load_weights(target, tmp_path / "nan.safetensors")
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items()), "must not half-load"
    state["0.weight"][0, 0, 0, 0] = float("inf")
    save_file(state, str(tmp_path / "inf.safetensors"))
    with pytest.raises(WeightsError, match="'0.weight'"):
        load_weights(target, tmp_path / "inf.safetensors")


@pytest.mark.parametrize("kind", ["pickle", "garbage", "empty"])
def test_non_safetensors_rejected(tmp_path, kind):
    path = tmp_path / "w.bin"
    if kind == "pickle":
        torch.save(build("lenet5").state_dict(), path)
    elif kind == "garbage":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    else:
        path.write_bytes(b"")
    with pytest.raises(WeightsError, match="w.bin"):
        load_weights(build("lenet5"), path)


def test_missing_weights_file(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        load_weights(build("lenet5"), tmp_path / "absent.safetensors")


def test_expected_sha256(tmp_path):
    path = save_weights(build("lenet5"), tmp_path / "w.safetensors")
    digest = sha256_of(path)
    load_weights(build("lenet5"), path, expected_sha256=digest)
    with pytest.raises(WeightsError, match="sha256"):
        load_weights(build("lenet5"), path, expected_sha256="0" * 64)


# --- user models ------------------------------------------------------------


def test_load_user_model(tmp_path):
    from tests.fixtures_user_model import build as user_build

    torch.manual_seed(5)
    trained = user_build()
    with torch.no_grad():
        for p in trained.parameters():
            p.mul_(3)
    path = save_weights(trained, tmp_path / "user.safetensors")
    model = load_user_model("tests.fixtures_user_model:build", path)
    assert not model.training
    for a, b in zip(trained.state_dict().values(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert load_user_model("tests.fixtures_user_model:build", num_classes=3)(torch.randn(2, 4, 4)).shape == (2, 3)
    via_resolve = resolve_model("tests.fixtures_user_model:build", path)
    assert torch.equal(via_resolve[1].weight, trained[1].weight)


@pytest.mark.parametrize(
    "spec",
    [
        "nocolon",
        "no.such.module:f",
        "tests.fixtures_user_model:missing",
        ":build",
        "tests.fixtures_user_model:",
        "tests.fixtures_user_model:not_a_model",
    ],
)
def test_bad_user_model_specs(spec):
    with pytest.raises(InputError):
        load_user_model(spec)


def test_user_model_with_wrong_weights(tmp_path):
    path = save_weights(build("lenet5"), tmp_path / "lenet5.safetensors")
    with pytest.raises(WeightsError):
        load_user_model("tests.fixtures_user_model:build", path)


# --- pretrained -------------------------------------------------------------


@pytest.fixture
def fake_pretrained(tmp_path, monkeypatch):
    """A private pretrained dir holding lenet5 weights, with a manifest we can tamper with."""
    published = build("lenet5", seed=42)
    path = save_weights(published, tmp_path / "lenet5.safetensors")
    manifest = {"lenet5": {"file": path.name, "sha256": sha256_of(path), "dataset": "fashion-mnist"}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(models, "PRETRAINED_DIR", tmp_path)
    monkeypatch.setattr(models, "read_manifest", lambda: json.loads((tmp_path / "manifest.json").read_text()))
    return published, tmp_path


def test_pretrained_loads_verified_weights(fake_pretrained):
    published, _ = fake_pretrained
    model = create_model("lenet5", pretrained=True)
    assert not model.training
    for a, b in zip(published.state_dict().values(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(resolve_model("lenet5")[0].weight, published[0].weight)


def test_pretrained_wrong_sha_rejected(fake_pretrained):
    _, root = fake_pretrained
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["lenet5"]["sha256"] = "f" * 64
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(WeightsError, match="sha256"):
        create_model("lenet5", pretrained=True)


def test_pretrained_replaced_file_rejected(fake_pretrained):
    _, root = fake_pretrained
    save_weights(build("lenet5", seed=7), root / "lenet5.safetensors")  # same format, different bytes
    with pytest.raises(WeightsError, match="does not match the manifest"):
        create_model("lenet5", pretrained=True)


def test_pretrained_missing_entry_and_kwargs(fake_pretrained):
    with pytest.raises(WeightsError, match="no pretrained weights for 'vgg'"):
        create_model("vgg", pretrained=True)
    with pytest.raises(InputError, match="num_classes"):
        create_model("lenet5", pretrained=True, num_classes=3)
    # Without pretrained, kwargs are fine and no manifest is consulted.
    assert create_model("vgg", num_classes=3)(torch.randn(1, 1, 28, 28)).shape == (1, 3)


def test_onnx_runs_at_other_batch_sizes():
    model = build("lenet5")
    session = ort_session(onnx_bytes(model, (1, 28, 28)))
    for n in (1, 4):
        x = torch.randn(n, 1, 28, 28)
        with torch.no_grad():
            assert np.abs(run_ort(session, x) - model(x).numpy()).max() < 1e-4
