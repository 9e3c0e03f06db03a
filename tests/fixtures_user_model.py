"""A user model builder for ``load_user_model("tests.fixtures_user_model:build")``."""

import torch
from torch import nn


def build(num_classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(4 * 4, 8), nn.ReLU(), nn.Linear(8, num_classes))


def not_a_model() -> str:
    return "not a module"
