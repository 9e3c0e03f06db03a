"""Channel-pruned models reload into their zoo architecture: checkpoints, archives, recipe resume."""

import pytest
import torch
from safetensors.torch import save_file

from deepshrink.compress.prune import ChannelPrune
from deepshrink.core.errors import WeightsError
from deepshrink.core.methods import apply_method
from deepshrink.encode.pack import pack, unpack
from deepshrink.models import create_model, list_models, resolve_model
from deepshrink.models.weights import load_weights, save_weights

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("name", list_models())
def test_pruned_model_reloads_into_its_architecture(name, tmp_path):
    torch.manual_seed(0)
    pruned = apply_method(create_model(name), ChannelPrune(ratio=0.5))
    x = torch.randn(2, 1, 28, 28)
    pack(pruned, tmp_path / "m.dsz", {"zoo": name})
    save_weights(pruned, tmp_path / "m.safetensors")
    from_archive = unpack(tmp_path / "m.dsz")
    from_file = load_weights(create_model(name), tmp_path / "m.safetensors", resize=True).eval()
    with torch.no_grad():
        expected = pruned(x)
        assert torch.equal(from_archive(x), expected)
        assert torch.equal(from_file(x), expected)
    assert sum(p.numel() for p in from_file.parameters()) == sum(p.numel() for p in pruned.parameters())


def test_without_resize_a_pruned_checkpoint_is_a_clear_error(tmp_path):
    pruned = apply_method(create_model("resnet20"), ChannelPrune(ratio=0.5))
    save_weights(pruned, tmp_path / "m.safetensors")
    with pytest.raises(WeightsError, match="do not match the model"):
        load_weights(create_model("resnet20"), tmp_path / "m.safetensors")


def test_resolve_model_loads_a_channel_pruned_checkpoint(tmp_path):
    """What `deepshrink eval/compress/quantize <zoo> --weights <pruned>` goes through."""
    torch.manual_seed(0)
    pruned = apply_method(create_model("resnet20"), ChannelPrune(ratio=0.5)).eval()
    save_weights(pruned, tmp_path / "m.safetensors")
    loaded = resolve_model("resnet20", tmp_path / "m.safetensors")
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))
    assert loaded.stem[0].out_channels == pruned.stem[0].out_channels < create_model("resnet20").stem[0].out_channels


def test_resolve_model_rejects_weights_whose_shapes_do_not_chain(tmp_path):
    model = create_model("lenet5")
    state = model.state_dict()
    state["0.weight"] = state["0.weight"][:3].clone()  # first conv loses channels its successor still expects
    state["0.bias"] = state["0.bias"][:3].clone()
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(WeightsError, match=r"bad\.safetensors: the layer shapes in these weights do not chain"):
        resolve_model("lenet5", tmp_path / "bad.safetensors")
