PYTHON ?= python3

.PHONY: gpu-check gpu-check-prepare bench bench-quick bench-smoke

# On a machine with a GPU, in at most 7 minutes: device facts, the tests that need the GPU with compiled
# kernels, then the quick benchmark sweep (8B decode first) and a one-screen summary. With OUT=<folder>
# every file goes there as soon as it is written. See benchmarks/README.md.
gpu-check:
	PYTHON=$(PYTHON) bash benchmarks/gpu_check.sh

# On a machine that reaches PyPI: the wheels a GPU machine without network needs, into .whl/ (llama-models).
gpu-check-prepare:
	bash benchmarks/prepare_gpu_check.sh

# The full sweep: every size and peer, 1B/3B/8B end to end (~15-25 minutes on an H100).
bench:
	$(PYTHON) -m benchmarks

bench-quick:
	$(PYTHON) -m benchmarks --quick

# Tiny shapes through the Triton interpreter on a CPU (what CI exercises); not performance figures.
bench-smoke:
	$(PYTHON) -m benchmarks --smoke
