"""Suite-wide setup.

Without a GPU, Triton kernels run in Triton's interpreter. It must be switched on before anything imports
Triton (``import torch._dynamo`` does), or kernels that call Triton's own jitted helpers fail in some test
orders; so it is set here, before any test module is imported. On a CUDA machine the kernels compile for real.
"""

import os
import shutil

if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
