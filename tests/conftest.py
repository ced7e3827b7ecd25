import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def real_model_path():
    from shared_inputs import real_model

    return real_model()


@pytest.fixture(scope="session")
def shared_data_dir():
    from shared_inputs import data_dir

    return data_dir()
