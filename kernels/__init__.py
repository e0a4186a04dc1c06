"""How it is made fast: Triton kernels, each with a plain PyTorch twin that defines its meaning."""
