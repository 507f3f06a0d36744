"""anetrain: train small Llama-family language models fast on the hardware you own.

The data flow is visible in the package layout::

    data/ -> kernels/ -> pipeline/ -> optim -> checkpoint / telemetry
    formats/ and tokenizer for files people already have; cli for the programs
"""

__version__ = "0.1.0"
