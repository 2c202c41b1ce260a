import os

import torch

# The Triton interpreter must be chosen before any @triton.jit function is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, os.cpu_count() or 1))


def device_under_test() -> torch.device:
    """Device the device-generic tests run on: LONGCTX_TEST_DEVICE (default cpu)."""
    return torch.device(os.environ.get("LONGCTX_TEST_DEVICE", "cpu"))


# tests/gpu holds what only a CUDA device can run (CUDA graphs, kernel speed paths); they are run
# on the GPU machine (`pytest tests/gpu`) and not collected at all elsewhere.
collect_ignore_glob = [] if torch.cuda.is_available() else ["gpu/*"]
