"""Robustness and stability metrics: noisy Top-1, flip rate, agreement with a reference, in torch and ONNX Runtime."""

import json

import pytest
import torch
from torch import nn

from deepshrink.core.errors import InputError
from deepshrink.data import ImageSet
from deepshrink.evaluate import evaluate
from deepshrink.evaluate.accuracy import ort_predict, predictions, torch_predict
from deepshrink.evaluate.robustness import measure_robustness
from deepshrink.export import onnx_bytes, ort_session
from deepshrink.models import create_model
from tests.conftest import cached_load_data


@pytest.fixture(scope="module")
def test_set() -> ImageSet:
    return cached_load_data(test_subset=1000).test


@pytest.fixture(scope="module")
def lenet5() -> nn.Module:
    return create_model("lenet5", pretrained=True).eval()


class ConstantClass(nn.Module):
    """Ignores its input: no noise can change its answer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tensor([0.0, 1.0] + [0.0] * 8).expand(len(x), 10)


def test_every_model_sees_the_same_noisy_images(test_set, lenet5):
    predict = torch_predict(lenet5)
    first, again = (predictions(predict, test_set, sigma=0.5, seed=3) for _ in range(2))
    assert torch.equal(first, again)
    assert not torch.equal(first, predictions(predict, test_set, sigma=0.5, seed=4))


def test_noise_lowers_top1_and_flips_more_classes_as_it_grows(test_set, lenet5):
    clean_top1 = 100.0 * float((predictions(torch_predict(lenet5), test_set) == test_set.labels).float().mean())
    report = measure_robustness(torch_predict(lenet5), test_set, sigmas=(0.05, 0.5, 1.5))
    assert clean_top1 - 2.0 <= report.noisy_top1[0] <= clean_top1 + 1.0
    assert report.noisy_top1[0] > report.noisy_top1[1] > report.noisy_top1[2]
    assert report.flip_rate[0] < report.flip_rate[1] < report.flip_rate[2] <= 100.0
    assert report.samples == len(test_set) and report.agreement is None


def test_an_input_blind_model_never_flips(test_set):
    report = measure_robustness(torch_predict(ConstantClass()), test_set)
    assert report.flip_rate == (0.0, 0.0, 0.0)
    assert report.noisy_top1[0] == report.noisy_top1[2] == pytest.approx(100.0 * float((test_set.labels == 1).float().mean()))


def test_agreement_with_the_reference(test_set, lenet5):
    own = predictions(torch_predict(lenet5), test_set)
    assert measure_robustness(torch_predict(lenet5), test_set, own).agreement == 100.0
    untrained = create_model("lenet5").eval()
    other = measure_robustness(torch_predict(untrained), test_set, own).agreement
    assert other < 50.0


def test_onnx_runtime_and_torch_measure_the_same(test_set, lenet5):
    session = ort_session(onnx_bytes(lenet5, (1, 28, 28)), 1)
    in_torch = measure_robustness(torch_predict(lenet5), test_set)
    in_ort = measure_robustness(ort_predict(session), test_set)
    for a, b in zip(in_torch.noisy_top1 + in_torch.flip_rate, in_ort.noisy_top1 + in_ort.flip_rate, strict=True):
        assert a == pytest.approx(b, abs=0.2)


def test_evaluate_reports_robustness_in_its_json(test_set, lenet5):
    report = evaluate(lenet5, test_set.subset(200), "lenet5", reference=lenet5, batch_sizes=(1,), repeats=2, onnx=False)
    assert report.robustness.agreement == 100.0
    payload = json.loads(json.dumps(report.to_dict()))
    assert payload["robustness"]["sigmas"] == [0.1, 0.25, 0.5] and len(payload["robustness"]["noisy_top1"]) == 3
    assert "sigma 0.25" in report.robustness.describe()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"sigmas": ()}, "sigmas"),
        ({"sigmas": (0.1, -0.2)}, "sigmas"),
        ({"reference": torch.zeros(3, dtype=torch.long)}, "reference has 3 predictions"),
    ],
)
def test_bad_settings_are_one_clear_error(test_set, lenet5, kwargs, message):
    with pytest.raises(InputError, match=message):
        measure_robustness(torch_predict(lenet5), test_set, **kwargs)


def test_no_images_is_a_clear_error(lenet5):
    empty = ImageSet(torch.zeros(0, 1, 28, 28), torch.zeros(0, dtype=torch.long))
    with pytest.raises(InputError, match="at least one"):
        measure_robustness(torch_predict(lenet5), empty)
