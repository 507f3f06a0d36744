"""The Apple Neural Engine backend: kernel programs as MIL text, their weight blobs, surfaces, a simulator.

No part of this package needs Apple hardware. It turns a :class:`~anetrain.config.ModelConfig` into the
dynamic-weight kernel set of the original trainer (weights are program *inputs*, so each kernel is compiled
once and shared by every layer), renders each kernel as the MIL text the in-memory ANE compiler accepts,
checks the same definitions with Apple's coremltools, and runs the text in a numpy simulator that rounds to
fp16 where the ANE does and enforces its binding rules. A macOS runtime compiles exactly these programs.

Modules, bottom up::

    dialect    per-chip MIL syntax and program version (m1/m2: program(1.0)/ios16; m3-m5: program(1.3)/ios18)
    blob       weight blobs with the 128-byte header (constants: causal mask, RoPE tables)
    mil        the program builder: ONE definition renders MIL text and a coremltools program
    shapes     dimensions and their zero padding to the hardware's multiple-of-32 matmul rule
    surfaces   IOSurface layouts [1, C, 1, W], operand placement, allocation sizes and binding order
    program    one kernel program (text, blobs, tensor specs, padding) built for an input convention
    programs   the kernel set of a model: forward, dx and the optional extras
    emit       writing a kernel set to a directory (one .mil per program, blobs, manifest.json)
    milparse   a parser for the MIL text subset the generator emits
    sim        the simulator: executes parsed MIL text with numpy in fp16
    pipeline   AneSimPipeline: the training step with forward/dx on the (simulated) ANE

The macOS runtime (part 2), top down::

    runtime    AneRuntimeExecutor / make_runtime_pipeline: `--backend ane`
    supervisor WorkerExecutor: the ANE work in a worker process, restarted before the compile budget runs out
    worker, ipc   the worker's loop and its framed message protocol (tensors through shared memory)
    budget     the compile-budget counter (the ~119-compile leak of _ANEInMemoryModel)
    device     the device interface, and a simulator device that can emulate failures (for tests)
    private    the _ANEInMemoryModelDescriptor / _ANEInMemoryModel / _ANERequest call sequence
    objc, iosurface   ctypes bridges to libobjc and IOSurface.framework
    coreml     the sanctioned fallback: programs as Core ML mlpackages, ComputeUnit.CPU_AND_NE
    machine    chip detection, macOS checks, the chips' published peaks
    selfcheck, peak, bench   `anetrain ane selfcheck`, `anetrain ane peak`, `anetrain bench --backend ane`
"""
