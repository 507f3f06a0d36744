"""WHEN kernels run: the training step as a schedule over the kernels.

``baseline``: the core kernels run serially in the parameters' dtype (float32, or float64 in tests): the
plain reference. ``optimized``: 16-bit compute with float32 master weights, buffers allocated once,
dW GEMMs concurrent with dx, fused elementwise work and a fused optimizer.
"""
