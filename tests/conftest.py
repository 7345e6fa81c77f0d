import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message=".*torch.jit.script.*")
torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _gin_clean():
    import gin

    gin.clear_config()
    yield
    gin.clear_config()
