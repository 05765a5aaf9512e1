"""Benchmarks: how close each kernel, and the whole decode loop, come to the device's limits.

    python -m llama3_triton.benchmarks                 # everything: ceilings, kernels, end to end, CPU decode
    python -m llama3_triton.benchmarks --quick         # the sizes the goals are judged at (gpu_check.py runs it)
    python -m llama3_triton.benchmarks --only kernels --kernel attention
    python -m llama3_triton.benchmarks.rmsnorm         # one kernel's benchmark (same flags)
    llama3-triton bench ...              # the same runner from the console script

Every run first measures the ceilings of the device it runs on (``common.measure_ceilings``: a large
device-to-device copy for bandwidth, a large bf16 matrix product for FLOP/s) and reports each figure as a
fraction of them, beside the peers timed in the same run (torch eager, ``torch.compile``, SDPA's flash
backend, the model's torch backend). Results land in ``benchmarks/results/<device>-<date>/``:
``results.json`` (every figure with its unit, the device, the library versions), ``results.md`` (the
tables) and ``plots/*.png``. Without a GPU the runner does a smoke run on tiny shapes through Triton's
interpreter, so CI exercises the code; its figures are not GPU performance, it says so, and its files go
to ``~/.cache/llama3-triton/bench/`` rather than the source tree.

Modules: ``common`` (context, timing, ceilings), one per kernel (``rmsnorm``, ``rope``, ``swiglu``,
``attention``, ``decode``), ``e2e`` (decode/prefill tokens/s of whole models), ``cpu`` (CPU decode against
Hugging Face transformers), ``report`` (JSON, Markdown, plots, the goals), ``runner`` (the command line),
``gpu_check`` (the headline, the GPU tests and the rest in one call on a GPU machine), ``gemv`` (the decode
step's products),
``sampling`` (the sampler's cost per token, standalone), and ``kernel_resources`` (the AOT compile gate's
register/spill report). Nothing runs at import.

Imports run one way: the runner imports the benchmark files, never the reverse. A benchmark file run as a
script (``python -m llama3_triton.benchmarks.rope``) hands its command line to the runner by module name, through
``run_as`` below, so no file imports the runner that imports it.
"""


def run_as(*args: str) -> int:
    """Run ``python -m llama3_triton.benchmarks *args <this process's arguments>``; return its exit status."""
    import runpy
    import sys

    sys.argv = ["python -m llama3_triton.benchmarks", *args, *sys.argv[1:]]
    try:
        runpy.run_module("benchmarks", run_name="__main__", alter_sys=True)
    except SystemExit as e:  # benchmarks/__main__.py ends with sys.exit(main())
        return e.code if isinstance(e.code, int) else 1
    return 0
