PYTHON ?= python3

.PHONY: gpu-check gpu-check-prepare bench bench-quick bench-smoke

# On a machine with a GPU, in at most 8 minutes: the 8B decode goal rows first, then the tests that need the GPU,
# then the rest of the benchmarks; every file written as it is made (to OUT=<folder> when set). Without make:
# python3 benchmarks/gpu_check.py. See benchmarks/README.md.
gpu-check:
	$(PYTHON) benchmarks/gpu_check.py

# On a machine that reaches PyPI: the wheels a GPU machine without network needs, into .whl/ (llama-models).
gpu-check-prepare:
	bash benchmarks/prepare_gpu_check.sh

# The full sweep: every size and peer, 1B/3B/8B end to end (~15-25 minutes on an H100).
bench:
	$(PYTHON) -m llama3_triton.benchmarks

bench-quick:
	$(PYTHON) -m llama3_triton.benchmarks --quick

# Tiny shapes through the Triton interpreter on a CPU (what CI exercises); not performance figures.
bench-smoke:
	$(PYTHON) -m llama3_triton.benchmarks --smoke
