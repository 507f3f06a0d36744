"""The Apple Neural Engine backend, split by where it runs.

**Any machine** (this package): a :class:`~anetrain.config.ModelConfig` becomes the dynamic-weight kernel set
(weights are program *inputs*, so each kernel is compiled once and shared by every layer): by default the
original trainer's ten programs, written as its generator writes them, else anetrain's own forms; rendered
as the MIL text the in-memory ANE compiler accepts, checked with Apple's coremltools and against the chips'
limits, and run by a numpy simulator that rounds to fp16 where the ANE does and enforces its binding rules.
Bottom up::

    dialect    per-chip MIL syntax and program version (m1/m2: program(1.0)/ios16; m3-m5: program(1.3)/ios18)
    blob       weight blobs with the 128-byte header (constants: causal mask, RoPE tables)
    mil        the graph of a program; MIL text in two layouts; coremltools programs; anetrain's builder
    limits     the chips' hard limits (width, channels, rank, matmul contraction), checked before any work
    shapes     dimensions and their zero padding to the hardware's multiple-of-32 matmul rule
    surfaces   IOSurface layouts [1, C, 1, W], operand placement, allocation sizes and binding order
    original   the original's ten programs, statement by statement (the default program set)
    program    anetrain's kernel definitions built for an input convention (packed or separate)
    programs   the kernel set of a model: either program set, plus anetrain's optional extras
    emit       writing a kernel set to a directory (one .mil per program, blobs, sizes.txt, manifest.json)
    milparse   a parser for the MIL text subset the generators emit
    sim        the simulator: executes parsed MIL text with numpy in fp16
    machine    chip detection, macOS checks, the chips' published peaks, ``--ane-chip auto``
    pipeline   AneSimPipeline: the training step with forward/dx on the (simulated) ANE
    selfcheck, peak, bench   `anetrain ane selfcheck`, `anetrain ane peak`, `anetrain bench --backend ane`
                             (their logic; they run programs through a runtime or the simulator)

**macOS on Apple silicon** (:mod:`.runtime`, tested here against stand-ins only), top down::

    runtime      AneRuntimeExecutor / make_runtime_pipeline: `--backend ane`
    supervisor   WorkerExecutor: the ANE work in a worker process, restarted within the compile budget
    worker, ipc  the worker's loop and its framed message protocol (tensors through shared memory)
    budget       the compile-budget counter (the ~119-compile leak of _ANEInMemoryModel)
    device       the device interface, and a simulator device that can emulate failures (for tests)
    private      the _ANEInMemoryModelDescriptor / _ANEInMemoryModel / _ANERequest call sequence
    objc, iosurface   ctypes bridges to libobjc and IOSurface.framework
    coreml       the sanctioned fallback: programs as Core ML mlpackages, ComputeUnit.CPU_AND_NE
"""
