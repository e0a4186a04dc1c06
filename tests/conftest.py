"""Suite-wide setup.

Without a GPU, Triton kernels run in Triton's interpreter. It must be switched on before anything imports
Triton (``import torch._dynamo`` does), or kernels that call Triton's own jitted helpers fail in some test
orders; so it is set here, before any test module is imported. On a CUDA machine the kernels compile for real.
"""

import os
import shutil

if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy 2-core machine they oversubscribe it
    (a 30-step training test took 14 s with 2 threads under load, 0.8 s with 1). Modules that want it for
    every test say ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
