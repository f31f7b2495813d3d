"""Every kernel test starts from the same torch seed, so a failure reproduces."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
