"""Suite-wide setup.

Where the Triton kernels run is decided here, once: compiled on the GPU when CUDA is usable, otherwise in
Triton's CPU interpreter. The interpreter must be switched on before anything imports Triton (``import
torch._dynamo`` does), or kernels that call Triton's own jitted helpers fail in some test orders; so it is set
here, before any test module is imported, and only without a GPU (on a CUDA machine the kernels compile for
real, and the kernel tests compare the compiled kernels with their PyTorch twins). Kernel tests take the
``kernel_device`` fixture and create their inputs there.
"""

import os
import shutil

if shutil.which("nvidia-smi") is None:  # no driver: no GPU; switched on before anything can import Triton
    os.environ["TRITON_INTERPRET"] = "1"


import pytest  # noqa: E402
import torch  # noqa: E402

# A driver but no usable device (a CPU build of torch, a hidden GPU): the interpreter too. `import torch` does
# not import Triton, so this is still in time.
CUDA = shutil.which("nvidia-smi") is not None and torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
KERNEL_DEVICE = torch.device("cuda" if CUDA else "cpu")


@pytest.fixture(scope="session")
def kernel_device() -> torch.device:
    """Where the kernel tests put their tensors: ``cuda`` (the compiled kernels) when a GPU is usable, else
    ``cpu`` (the kernels in Triton's interpreter)."""
    return KERNEL_DEVICE


@pytest.fixture
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy 2-core machine they oversubscribe it
    (a 30-step training test took 14 s with 2 threads under load, 0.8 s with 1). Modules that want it for
    every test say ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
