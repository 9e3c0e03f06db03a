"""Knowledge distillation: the losses against closed forms, the KD hook in the shared loop, the distill task and CLI."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import deepshrink.data
from deepshrink.cli import main
from deepshrink.compress.distill import KD, Distill, KDHook, TeacherCache, distill, hint_loss, kd_loss, soft_target_loss
from deepshrink.core.errors import InputError
from deepshrink.core.methods import Context, apply_method
from deepshrink.data import DataBundle
from deepshrink.evaluate import evaluate_accuracy
from deepshrink.export import ort_session, run_ort
from deepshrink.models import create_model, load_weights
from deepshrink.train import TrainConfig, Trainer
from tests.conftest import make_learnable_set

S = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
T_LOGITS = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
Y = torch.tensor([1, 2])


def softmax(row: list[float], temperature: float = 1.0) -> list[float]:
    exps = [math.exp(v / temperature) for v in row]
    return [e / sum(exps) for e in exps]


def closed_form_soft(temperature: float) -> float:
    total = 0.0
    for s_row, t_row in zip(S.tolist(), T_LOGITS.tolist(), strict=True):
        p_s, p_t = softmax(s_row, temperature), softmax(t_row, temperature)
        total += sum(pt * math.log(pt / ps) for ps, pt in zip(p_s, p_t, strict=True))
    return temperature**2 * total / len(S)


def closed_form_ce() -> float:
    return -sum(math.log(softmax(row)[y]) for row, y in zip(S.tolist(), Y.tolist(), strict=True)) / len(S)


@pytest.fixture(scope="module")
def bundle() -> DataBundle:
    data = make_learnable_set(384, seed=7)

    def part(a: int, b: int) -> deepshrink.data.ImageSet:
        return deepshrink.data.ImageSet(data.images[a:b], data.labels[a:b])

    return DataBundle("synthetic", part(0, 256), part(256, 320), part(320, 384), 4, (0.0,), (1.0,))


@pytest.fixture(scope="module")
def teacher(bundle) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model("lenet5", num_classes=4)
    Trainer(model, TrainConfig(epochs=4, batch_size=32, lr=0.05), bundle.train, progress=False).fit()
    assert evaluate_accuracy(model, bundle.test).top1 >= 95.0
    return model


def student(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("lenet_small", num_classes=4)


# -- losses -----------------------------------------------------------------------------
@pytest.mark.unit
@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_soft_target_loss_is_t_squared_kl(temperature):
    assert soft_target_loss(S, T_LOGITS, temperature).item() == pytest.approx(closed_form_soft(temperature), rel=1e-6)


@pytest.mark.unit
def test_soft_target_gradient_is_t_times_probability_gap():
    """The T² factor makes d/ds = T·(p_s − p_t)/B: gradients keep their scale as T grows (Hinton's reason for it)."""
    temperature = 4.0
    s = S.clone().requires_grad_(True)
    soft_target_loss(s, T_LOGITS, temperature).backward()
    expected = temperature * (F.softmax(S / temperature, 1) - F.softmax(T_LOGITS / temperature, 1)) / len(S)
    assert torch.allclose(s.grad, expected, atol=1e-7)


@pytest.mark.unit
@pytest.mark.parametrize(("temperature", "alpha"), [(4.0, 0.9), (2.0, 0.5), (1.0, 0.0), (3.0, 1.0)])
def test_kd_loss_closed_form(temperature, alpha):
    expected = alpha * closed_form_soft(temperature) + (1 - alpha) * closed_form_ce()
    assert kd_loss(S, T_LOGITS, Y, temperature, alpha).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.unit
def test_identical_logits_give_zero_soft_loss_and_hint_loss_is_mse():
    assert soft_target_loss(T_LOGITS, T_LOGITS, 3.0).item() == pytest.approx(0.0, abs=1e-7)
    student_map, teacher_map = torch.randn(2, 3, 8, 8), torch.randn(2, 5, 4, 4)
    adapter = torch.nn.Conv2d(3, 5, 1, bias=False)
    expected = ((F.adaptive_avg_pool2d(adapter(student_map), 4) - teacher_map) ** 2).mean()
    assert hint_loss(student_map, teacher_map, adapter).item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.unit
def test_hook_makes_the_trainer_loss_hintons():
    """Trainer CE + the hook's extra term == alpha·soft + (1 − alpha)·CE (label smoothing cancels too)."""
    teacher = torch.nn.Linear(3, 3)
    x = torch.randn(2, 3)
    with torch.no_grad():
        t_logits = teacher(x)
    hook = KDHook(teacher, KD(temperature=2.0, alpha=0.7))
    trainer = SimpleNamespace(config=TrainConfig(label_smoothing=0.1))
    total = F.cross_entropy(S, Y, label_smoothing=0.1) + hook.extra_loss(trainer, x, Y, S)
    assert total.item() == pytest.approx(kd_loss(S, t_logits, Y, 2.0, 0.7, label_smoothing=0.1).item(), rel=1e-6)
    assert not teacher.training


@pytest.mark.unit
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"temperature": 0.0}, "temperature"),
        ({"alpha": 1.5}, "alpha"),
        ({"hint_weight": -1.0}, "hint_weight"),
    ],
)
def test_bad_kd_settings_raise(kwargs, match):
    with pytest.raises(InputError, match=match):
        KD(**kwargs)


@pytest.mark.unit
def test_distill_config_from_dict_and_unknown_keys():
    cfg = Distill.from_dict({"teacher": "resnet20", "kd": {"temperature": 2, "hints": {"5": "5"}}, "train": {"epochs": 1}})
    assert cfg.kd.temperature == 2.0 and cfg.kd.hints == {"5": "5"} and cfg.train.epochs == 1
    with pytest.raises(InputError, match=r"Distill.kd: unknown key\(s\) \['temp'\]"):
        Distill.from_dict({"kd": {"temp": 2}})
    with pytest.raises(InputError, match="alpha"):
        Distill.from_dict({"kd": {"alpha": 2}})


# -- the hook in the loop --------------------------------------------------------------------
@pytest.mark.unit
def test_teacher_cache_gives_the_same_training_as_running_the_teacher(bundle, teacher):
    cfg = Distill(kd=KD(cache_teacher=True), train=TrainConfig(epochs=2, batch_size=64, lr=0.05))
    cache = TeacherCache()
    cached = distill(student(), teacher, bundle, cfg, progress=False, cache=cache)
    fresh = distill(student(), teacher, bundle, Distill(kd=KD(cache_teacher=False), train=cfg.train), progress=False)
    assert cache.misses == len(bundle.train) and cache.hits == len(bundle.train)  # epoch 1 fills it, epoch 2 reads it
    for (name, a), b in zip(cached.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-5), name
    with torch.no_grad():
        # The cache filled these rows in batches of 64; batched GEMM kernels (AVX-512/AMX) round
        # differently per batch size, so the bar is fp32 rounding, not bit equality.
        torch.testing.assert_close(cache.lookup(teacher, bundle.train.images[:5]), teacher(bundle.train.images[:5]), rtol=1e-6, atol=1e-5)


@pytest.mark.unit
def test_distill_matches_the_teacher_and_leaves_it_unchanged(bundle, teacher):
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    cfg = Distill(kd=KD(temperature=4.0, alpha=1.0), train=TrainConfig(epochs=6, batch_size=32, lr=0.02))
    out = distill(student(), teacher, bundle, cfg, progress=False)
    with torch.no_grad():
        agree = (out(bundle.test.images).argmax(1) == teacher(bundle.test.images).argmax(1)).float().mean().item()
    assert agree >= 0.9  # alpha 1: the labels are never seen, the student learnt the teacher
    assert evaluate_accuracy(out, bundle.test).top1 >= 85.0
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


@pytest.mark.unit
def test_hint_adapters_are_trained_and_removed(bundle, teacher):
    """FitNets hints on the pooled conv features: the adapter learns and the hint loss falls."""
    model = student()
    hook = KDHook(teacher, KD(hints={"5": "5"}, hint_weight=3.0))
    config = TrainConfig(epochs=3, batch_size=32, lr=0.02)
    with hook.attached(model, (1, 28, 28)) as trainee:
        adapter = hook.adapters[0]
        assert isinstance(adapter, torch.nn.Conv2d) and (adapter.in_channels, adapter.out_channels) == (8, 16)
        start = adapter.weight.detach().clone()

        def mean_hint() -> float:
            with torch.no_grad():
                model.eval()(bundle.val.images)
                teacher(bundle.val.images)
                return hint_loss(hook._student_features["5"], hook._teacher_features["5"], adapter).item()

        before = mean_hint()
        trainer = Trainer(trainee, config, bundle.train, hooks=[hook], progress=False)
        assert any(p is adapter.weight for group in trainer.optimizer.param_groups for p in group["params"])
        trainer.fit()
        after = mean_hint()
    assert not torch.equal(adapter.weight, start)
    assert after < 0.5 * before
    assert set(model.state_dict()) == set(student().state_dict())  # the student's own layers only
    assert evaluate_accuracy(model, bundle.test).top1 >= 80.0


@pytest.mark.unit
def test_hints_naming_a_missing_layer_raise(teacher):
    hook = KDHook(teacher, KD(hints={"5": "5", "nope": "5"}))
    with pytest.raises(InputError, match="student has no layer 'nope'"), hook.attached(student(), (1, 28, 28)):
        pass
    assert not hook._handles and not teacher._forward_hooks  # nothing left hooked after the error
    with pytest.raises(InputError, match="hints need the student attached"):
        hook.extra_loss(
            SimpleNamespace(config=TrainConfig()), torch.zeros(2, 1, 28, 28), torch.zeros(2, dtype=torch.long), torch.zeros(2, 4)
        )


@pytest.mark.unit
def test_registered_step_needs_a_teacher(bundle, teacher):
    with pytest.raises(InputError, match="no teacher"):
        apply_method(student(), Distill(train=TrainConfig(epochs=1)), Context(bundle, progress=False))
    ctx = Context(bundle, progress=False)
    ctx.teacher = teacher  # what a recipe runner sets: the model before compression
    out = apply_method(student(), Distill(kd=KD(alpha=1.0), train=TrainConfig(epochs=6, batch_size=32, lr=0.02)), ctx)
    assert evaluate_accuracy(out, bundle.test).top1 >= 70.0


# -- CLI -----------------------------------------------------------------------------------
@pytest.mark.flow
def test_cli_distill_resnet20_into_lenet_small(tmp_path, capsys, load_data_once):
    out = tmp_path / "kd"
    argv = ["distill", "--teacher", "resnet20", "--student", "lenet_small", "--epochs", "3", "--lr", "0.02"]
    argv += ["--batch-size", "32", "--train-subset", "2000", "--test-subset", "300", "--val-size", "200", "--threads", "1"]
    argv += ["--no-progress", "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["before"]["top1"] >= 90.0 and report["after"]["params"] == 7674
    assert report["after"]["top1"] >= 70.0 and report["config"]["kd"]["temperature"] == 4.0
    model = load_weights(create_model("lenet_small"), out / "model.safetensors")
    x = deepshrink.data.load_data(val_size=200, test_subset=300).test.images[:32]
    with torch.no_grad():
        assert np.abs(run_ort(ort_session(str(out / "model.onnx"), 1), x) - model(x).numpy()).max() < 1e-4
    assert "teacher" in capsys.readouterr().out


@pytest.mark.flow
def test_cli_distill_rejects_bad_flags(capsys):
    assert main(["distill", "--teacher", "resnet20", "--student", "lenet_small", "--alpha", "2"]) == 2
    assert "alpha must be in [0.0, 1.0]" in capsys.readouterr().err
    assert main(["distill", "--teacher", "resnet20", "--student", "lenet_small", "--hint", "bad"]) == 2
    assert "--hint" in capsys.readouterr().err
