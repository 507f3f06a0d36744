"""WHERE kernels run: fused and device-specific implementations of the kernels' math.

``fused``: allocation-free, hand-fused torch implementations (CPU and CUDA) used by the optimized pipeline;
``compiled``: the same stretches of elementwise work as ``torch.compile``'d kernels; ``fusion``: the one
interface the pipeline calls for either, with the typed scratch they use; ``buffers``: typed buffer sets (each
buffer declared with its shape) and the function that sizes and allocates them; ``gemm``: which BLAS does the
matrix products. The Neural Engine backend lives in ``anetrain.ane`` (MIL programs, simulator, macOS runtime).
"""
