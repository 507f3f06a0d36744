"""WHERE kernels run: fused and device-specific implementations of the kernels' math.

``fused``: allocation-free, hand-fused torch implementations (CPU and CUDA) used by the optimized pipeline.
The Neural Engine backend lives in ``anetrain.ane`` (MIL programs, simulator, macOS runtime).
"""
