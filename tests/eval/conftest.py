import pytest

from longctx.loading.checkpoint import load_checkpoint
from longctx.loading.default_model import default_model_path


@pytest.fixture(scope="session")
def tokenizer():
    """The default model's tokenizer (reading it does not dequantize the weights)."""
    return load_checkpoint(default_model_path(fetch=True)).tokenizer
