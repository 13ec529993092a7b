"""kernels: Triton kernels with plain-PyTorch references beside them. Imports nothing of this project.

Not built yet (see the project's issues); vqtok.lookup.nearest_code is where the fused codebook lookup will plug in.
"""
