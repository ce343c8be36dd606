"""Shared test helpers: randomized BatchNorm statistics (default-initialized BN hides fusion bugs)."""

from __future__ import annotations

import pytest
import torch
from torch import nn


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm random running mean/var and affine parameters, reproducibly."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features

                def uniform(lo: float, hi: float) -> torch.Tensor:
                    return lo + (hi - lo) * torch.rand(n, generator=gen)

                module.running_mean.copy_(uniform(-0.5, 0.5))
                module.running_var.copy_(uniform(0.5, 2.0))
                if module.affine:
                    module.weight.copy_(uniform(0.5, 1.5))
                    module.bias.copy_(uniform(-0.3, 0.3))
    return model


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
