import os
import sys
from pathlib import Path

# Set before torch starts OpenMP: idle OpenMP threads sleep instead of spinning, so test subprocesses (the CLI,
# torchrun ranks) that share the 2 CI cores do not slow each other down by an order of magnitude.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Without a GPU the Triton kernels are tested under Triton's interpreter, which must be switched on before
# anything (transformers, bitsandbytes, torch._inductor) imports triton.
if not Path("/dev/nvidia0").exists():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

_REPO = Path(__file__).resolve().parents[1]
# `python -m pytest` from the repo root puts the root on sys.path, where the folder kernels/ (installed as
# llmtune.kernels) would shadow PyPI's `kernels` package that bitsandbytes tries to import. llmtune itself is
# imported from its installation (pip install -e .), so the root is not needed there.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _REPO]
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


@pytest.fixture(scope="session")
def _hf_real_model(real_model_path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(real_model_path.parent), gguf_file=real_model_path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def hf_real_model_copy(_hf_real_model):
    """A function returning a fresh deep copy of transformers' own float32 import of the real GGUF model.

    transformers' GGUF import is the slowest step of the real-model tests, so it runs once per session;
    each caller gets its own copy (peft wraps models in place).
    """
    import copy

    return lambda: copy.deepcopy(_hf_real_model)


@pytest.fixture(scope="session")
def hf_real_tokenizer(real_model_path):
    """transformers' tokenizer built from the real GGUF file (read-only use)."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(real_model_path.parent), gguf_file=real_model_path.name)


@pytest.fixture(scope="session")
def _llmtune_real_model(real_model_path):
    from llmtune.models.loader import load_model

    return load_model(real_model_path, dtype="float32").eval()


@pytest.fixture(scope="session")
def real_model_copy(_llmtune_real_model):
    """A function returning a fresh deep copy of llmtune's float32 load of the real GGUF model."""
    import copy

    return lambda: copy.deepcopy(_llmtune_real_model)
