"""Suite-wide settings: offline hub, one torch thread.

The suite's tensors are small; on a 2-core machine (CI's size) a second intra-op thread only
adds wake-up latency, and under load it made small matrix products hundreds of times slower.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download; read by huggingface_hub at import

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
