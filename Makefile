PYTHON ?= python3

.PHONY: gpu-check bench bench-quick bench-smoke

# On a machine with a GPU, in one go (fits the device tool's 10-minute command): device info, the test
# suite with compiled kernels, then the quick benchmark sweep; logs and results also go to $OUT if set.
gpu-check:
	PYTHON=$(PYTHON) bash benchmarks/gpu_check.sh

# The full sweep: every size and peer, 1B/3B/8B end to end (~15-25 minutes on an H100).
bench:
	$(PYTHON) -m benchmarks

bench-quick:
	$(PYTHON) -m benchmarks --quick

# Tiny shapes through the Triton interpreter on a CPU (what CI exercises); not performance figures.
bench-smoke:
	$(PYTHON) -m benchmarks --smoke
