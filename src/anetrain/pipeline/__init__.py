"""WHEN kernels run: the training step as a schedule over the kernels.

``base``: the :class:`~.base.Pipeline` protocol every pipeline implements (the Neural Engine's too, in
``anetrain.ane``). ``baseline``: the core kernels run serially in the parameters' dtype (float32, or float64
in tests): the plain reference. ``optimized``: 16-bit compute with float32 master weights, buffers allocated
once (``workspace``: the typed buffer set), dW GEMMs concurrent with dx, fused elementwise work and a fused
optimizer. ``dw``: the executors that run the dW GEMMs. Which pipeline a user's options pick is decided above
this package, in ``anetrain.pipeline_factory``.
"""
