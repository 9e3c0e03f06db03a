"""The training loop: learning, determinism, checkpoint resume, hooks and config validation."""

from dataclasses import replace

import pytest
import torch

from deepshrink.core.errors import InputError
from deepshrink.data import ImageSet
from deepshrink.models import create_model
from deepshrink.train import TrainConfig, Trainer, TrainHook, train

pytestmark = pytest.mark.unit


def model_for(name: str = "lenet300", seed: int = 0, num_classes: int = 4):
    torch.manual_seed(seed)
    return create_model(name, num_classes=num_classes)


def accuracy(model, data: ImageSet) -> float:
    with torch.no_grad():
        return 100.0 * (model.eval()(data.images).argmax(1) == data.labels).float().mean().item()


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def test_training_learns(learnable_set):
    model = model_for()
    before = accuracy(model, learnable_set)
    result = train(model, learnable_set, TrainConfig(epochs=3, batch_size=32, lr=0.05, seed=0), progress=False)
    after = accuracy(model, learnable_set)
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    assert result.history[-1]["train_loss"] < 0.5 * result.history[0]["train_loss"]
    assert before < 50 and after > 90, (before, after)  # 4 classes: chance is 25%
    assert not model.training and result.wall_time_s > 0


def test_training_with_validation_reports_val_metrics(learnable_set):
    val = ImageSet(learnable_set.images[:64], learnable_set.labels[:64])
    result = Trainer(model_for(), TrainConfig(epochs=2, batch_size=64, lr=0.05), learnable_set, val, progress=False).fit()
    assert all({"val_top1", "val_loss", "train_loss", "train_top1", "lr"} <= h.keys() for h in result.history)
    assert result.history[-1]["val_top1"] > 50


def test_grad_clip_bounds_every_step(learnable_set):
    """Plain SGD moves the weights by at most lr x clip per step; without clipping far more."""
    config = TrainConfig(epochs=1, batch_size=64, lr=0.5, momentum=0.0, weight_decay=0.0, schedule="constant", channels_last=False)
    steps = -(-len(learnable_set) // config.batch_size)
    moved = {}
    for clip in (None, 1e-3):
        model = model_for()
        before = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
        train(model, learnable_set, replace(config, grad_clip=clip), progress=False)
        moved[clip] = float((torch.nn.utils.parameters_to_vector(model.parameters()).detach() - before).norm())
    assert moved[1e-3] <= steps * 0.5 * 1e-3 * (1 + 1e-4)
    assert moved[None] > 10 * moved[1e-3]


def test_same_seed_same_weights(learnable_set):
    config = TrainConfig(epochs=2, batch_size=64, lr=0.05, augment=True, seed=3)
    runs = []
    for _ in range(2):
        model = model_for("lenet5", seed=1)
        train(model, learnable_set, config, progress=False)
        runs.append(weights(model))
    assert_same_weights(*runs)
    other = model_for("lenet5", seed=1)
    train(other, learnable_set, TrainConfig(epochs=2, batch_size=64, lr=0.05, augment=True, seed=4), progress=False)
    assert not torch.equal(weights(other)["0.weight"], runs[0]["0.weight"])


class InterruptAt(TrainHook):
    def __init__(self, epoch: int | None = None, step: int | None = None) -> None:
        self.epoch, self.step = epoch, step

    def after_step(self, trainer):
        if trainer.step == self.step:
            raise KeyboardInterrupt

    def on_epoch_end(self, trainer, metrics):
        if trainer.epoch == self.epoch:
            raise KeyboardInterrupt


class StepCounter(TrainHook):
    def __init__(self) -> None:
        self.steps: list[int] = []
        self.epochs: list[dict] = []

    def after_step(self, trainer):
        self.steps.append(trainer.step)

    def on_epoch_end(self, trainer, metrics):
        self.epochs.append(dict(metrics))


RESUME_CONFIG = TrainConfig(epochs=4, batch_size=64, lr=0.05, augment=True, seed=7)  # 4 steps per epoch


@pytest.fixture
def uninterrupted(learnable_set):
    model = model_for("lenet5", seed=11)
    result = Trainer(model, RESUME_CONFIG, learnable_set, progress=False).fit()
    return weights(model), result


@pytest.mark.parametrize("interrupt", [InterruptAt(epoch=2), InterruptAt(step=10)], ids=["epoch-end-2", "mid-epoch-3"])
def test_resume_after_interrupt_matches_uninterrupted(tmp_path, learnable_set, uninterrupted, interrupt):
    expected, full = uninterrupted
    ckpt = tmp_path / "ckpt" / "run.pt"
    first = model_for("lenet5", seed=11)
    with pytest.raises(KeyboardInterrupt):
        Trainer(first, RESUME_CONFIG, learnable_set, hooks=[interrupt], checkpoint=ckpt, progress=False).fit()
    assert ckpt.is_file() and not list(ckpt.parent.glob("*.tmp"))
    saved_epoch = torch.load(ckpt, weights_only=True)["epoch"]
    assert 1 <= saved_epoch <= 2
    # Something unrelated consumes the global RNG in between, as a real restart would.
    torch.manual_seed(999)
    torch.randn(100)
    resumed_model = model_for("lenet5", seed=11)
    counter = StepCounter()
    result = Trainer(resumed_model, RESUME_CONFIG, learnable_set, hooks=[counter], checkpoint=ckpt, progress=False).fit()
    assert counter.steps == list(range(4 * saved_epoch + 1, 17)), "resume continues, it does not restart"
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4]
    assert result.history == full.history
    assert_same_weights(weights(resumed_model), expected)
    assert torch.load(ckpt, weights_only=True)["epoch"] == 4


def test_resume_of_finished_run_is_a_no_op(tmp_path, learnable_set):
    ckpt = tmp_path / "done.pt"
    config = TrainConfig(epochs=1, batch_size=128, lr=0.05)
    model = model_for(seed=2)
    first = Trainer(model, config, learnable_set, checkpoint=ckpt, progress=False).fit()
    counter = StepCounter()
    again = model_for(seed=5)
    result = Trainer(again, config, learnable_set, hooks=[counter], checkpoint=ckpt, progress=False).fit()
    assert counter.steps == [] and len(result.history) == 1
    # the training time is carried in the checkpoint (it is stamped before the fsynced write, so
    # first.wall_time_s, which includes that write, can be larger than the carried value)
    saved = torch.load(ckpt, weights_only=True)["wall_time_s"]
    assert result.wall_time_s >= saved > 0 and saved <= first.wall_time_s
    assert_same_weights(weights(again), weights(model))


def test_checkpoint_with_different_config_rejected(tmp_path, learnable_set):
    ckpt = tmp_path / "run.pt"
    Trainer(model_for(), TrainConfig(epochs=1, batch_size=128, lr=0.05), learnable_set, checkpoint=ckpt, progress=False).fit()
    with pytest.raises(InputError, match="different training config"):
        Trainer(model_for(), TrainConfig(epochs=1, batch_size=128, lr=0.01), learnable_set, checkpoint=ckpt, progress=False).fit()


def test_extra_loss_hook_is_added(learnable_set):
    config = TrainConfig(epochs=2, batch_size=64, lr=0.1, momentum=0.0, weight_decay=0.0, schedule="constant")
    coef = 0.5 / (2 * config.lr)  # each step multiplies weights by ~(1 - 0.5)

    class L2(TrainHook):
        def __init__(self):
            self.calls = 0

        def extra_loss(self, trainer, inputs, targets, logits):
            self.calls += 1
            assert inputs.shape[0] == targets.shape[0] == logits.shape[0] and logits.shape[1] == 4
            return coef * sum((p**2).sum() for p in trainer.model.parameters())

    class Nothing(TrainHook):
        def extra_loss(self, trainer, inputs, targets, logits):
            return None

    plain, shrunk = model_for(seed=0), model_for(seed=0)
    plain_result = train(plain, learnable_set, config, hooks=[Nothing()], progress=False)
    l2 = L2()
    shrunk_result = train(shrunk, learnable_set, config, hooks=[l2], progress=False)
    assert l2.calls == 8

    def norm(m):
        return torch.sqrt(sum((p**2).sum() for p in m.parameters())).item()

    assert norm(shrunk) < 0.05 * norm(plain)
    # The reported loss includes the extra term: large at the start.
    assert shrunk_result.history[0]["train_loss"] > plain_result.history[0]["train_loss"] + 1.0


def test_hooks_called_once_per_step_and_epoch(learnable_set):
    counters = [StepCounter(), StepCounter()]
    result = train(model_for(), learnable_set, TrainConfig(epochs=2, batch_size=100, lr=0.05), hooks=counters, progress=False)
    for c in counters:  # 256 samples / 100 per batch = 3 steps per epoch
        assert c.steps == [1, 2, 3, 4, 5, 6]
        assert [m["epoch"] for m in c.epochs] == [1, 2]
        assert c.epochs == result.history


def test_fit_restores_contiguous_format(learnable_set):
    model = model_for("lenet5")
    train(model, learnable_set.subset(64), TrainConfig(epochs=1, batch_size=64, channels_last=True), progress=False)
    conv = model[0].weight
    assert conv.is_contiguous() and not model.training


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"epochs": 0}, "epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"lr": 0}, "lr"),
        ({"lr": -0.1}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"label_smoothing": 1.0}, "label_smoothing"),
        ({"label_smoothing": -0.1}, "label_smoothing"),
        ({"grad_clip": 0.0}, "grad_clip"),
        ({"grad_clip": -1.0}, "grad_clip"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(InputError, match=match):
        TrainConfig(**kwargs)


def test_config_valid_edge_values():
    config = TrainConfig(epochs=1, batch_size=1, lr=1e-9, label_smoothing=0.0)
    assert config.epochs == 1
    assert TrainConfig(label_smoothing=0.99).label_smoothing == 0.99
