"""ONNX export: a checked file on disk, a dynamic batch axis, clean failures."""

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from deepshrink.export import ExportError, export_onnx, onnx_bytes, ort_session, run_ort
from deepshrink.models import create_model

pytestmark = pytest.mark.unit


def lenet5():
    torch.manual_seed(0)
    return create_model("lenet5")


def test_export_onnx_writes_checked_file_with_dynamic_batch(tmp_path):
    model = lenet5()
    path = export_onnx(model, tmp_path / "out" / "lenet5.onnx", (1, 28, 28))
    assert path == tmp_path / "out" / "lenet5.onnx" and path.is_file()
    assert not list(path.parent.glob("*.tmp"))
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert [i.name for i in proto.graph.input] == ["input"]
    assert [o.name for o in proto.graph.output] == ["logits"]
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param == "batch" and not batch_dim.HasField("dim_value")
    session = ort_session(path, threads=1)
    for n in (1, 5):
        x = torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(n))
        out = run_ort(session, x)
        with torch.no_grad():
            expected = model(x).numpy()
        assert out.shape == (n, 10)
        assert np.abs(out - expected).max() < 1e-4


def test_export_restores_training_mode_and_overwrites(tmp_path):
    model = lenet5().train()
    path = tmp_path / "m.onnx"
    path.write_bytes(b"stale")
    export_onnx(model, path, (1, 28, 28))
    assert model.training
    assert path.read_bytes() == onnx_bytes(model, (1, 28, 28))


def test_export_uses_eval_mode():
    """Dropout in train mode would make the export random; the graph must be the eval one."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Dropout(0.9), nn.Linear(8, 3)).train()
    session = ort_session(onnx_bytes(model, (1, 4, 4)))
    x = torch.randn(4, 1, 4, 4)
    with torch.no_grad():
        expected = model.eval()(x).numpy()
    assert np.abs(run_ort(session, x) - expected).max() < 1e-5


class CallsNumpy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return torch.from_numpy(self.fc(x.flatten(1)).numpy())


class UsesSvd(nn.Module):
    def forward(self, x):
        return torch.linalg.svd(x)[0]


class ReturnsNothing(nn.Module):
    def forward(self, x):
        return None


@pytest.mark.parametrize(
    "module, shape",
    [(CallsNumpy, (1, 2, 2)), (UsesSvd, (1, 3, 3)), (ReturnsNothing, (1, 2, 2))],
    ids=["numpy", "unsupported-op", "no-output"],
)
def test_unexportable_model_raises_export_error(tmp_path, module, shape):
    model = module().train()
    path = tmp_path / "bad.onnx"
    with pytest.raises(ExportError, match="ONNX export failed") as info:
        export_onnx(model, path, shape)
    assert "\n" not in str(info.value), "one-line message for the CLI"
    assert not path.exists() and not list(tmp_path.glob("*.tmp"))
    assert model.training, "mode restored even on failure"


@pytest.mark.parametrize("training", [True, False])
def test_export_leaves_the_callers_mode_on_every_submodule(training):
    model = create_model("lenet5").train(training)
    onnx_bytes(model, (1, 28, 28))
    assert all(m.training == training for m in model.modules())
