import os

import pytest
import torch

# Tests run under `pytest -n 2` on 2 cores: one thread per worker.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
