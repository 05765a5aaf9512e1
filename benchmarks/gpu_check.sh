#!/usr/bin/env bash
# The GPU check: what a session with a lent GPU runs in one call (`make gpu-check`).
#
#   1. device information: nvidia-smi, the library versions, which needed packages import;
#   2. the whole test suite on the GPU, compiled (TRITON_INTERPRET unset); its exit status is recorded
#      and the check goes on;
#   3. the benchmark runner, --quick, into benchmarks/results/<device>-<date>/.
#
# With $OUT set (the device tool's output folder) the logs go there, and the results are copied there at
# the end: device.txt, pytest.log, bench.log, results.json, results.md, plots.tar.gz (six files: the tool
# brings back at most eight). Without $OUT the logs go into the results folder.
#
# The device tool stops a command after 10 minutes, so everything here fits GPU_CHECK_BUDGET_S (default
# 540 s): the suite gets at most PYTEST_BUDGET_S (default 240 s), the benchmarks what is left, with the
# runner's own --time-budget a minute short of that (it records what it had no time for as skipped) and
# a SIGINT as a backstop (the runner then writes its partial results). Wheels carried in .whl/ (see the
# device notes; e.g. llama-models, whose tokenizer.model the end-to-end benchmarks need) are installed
# first. Exit status: 0 when the tests and the benchmarks both succeeded, else 1.
set -u -o pipefail

start=$(date +%s)
budget=${GPU_CHECK_BUDGET_S:-540}
pytest_budget=${PYTEST_BUDGET_S:-240}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root" || exit 1
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH}

results=$("$PY" -c '
import torch
from benchmarks.common import Context, default_out_dir
cuda = torch.cuda.is_available()
print(default_out_dir(Context(device=torch.device("cuda" if cuda else "cpu"), dtype=torch.bfloat16, smoke=not cuda)))
' 2>/dev/null) || results="$root/benchmarks/results/gpu-check-$(date +%F)"
logs=${OUT:-$results}
mkdir -p "$logs" "$results"

{
    echo "== gpu-check $(date -u +%FT%TZ) in $root; results -> $results"
    nvidia-smi || echo "nvidia-smi failed"
    "$PY" - <<'PYEOF'
import importlib, platform
import torch, triton
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}")
print("cuda available:", torch.cuda.is_available())
if torch.cuda.is_available():
    print(torch.cuda.get_device_properties(0))
for name in ("llama_models", "tiktoken", "safetensors", "tqdm", "transformers", "matplotlib", "pytest_benchmark"):
    try:
        importlib.import_module(name)
        print(f"{name}: ok")
    except Exception as e:
        print(f"{name}: MISSING ({type(e).__name__}: {e})")
PYEOF
} 2>&1 | tee "$logs/device.txt"

echo "== pytest on the GPU, compiled kernels (at most ${pytest_budget} s)"
timeout --signal=INT --kill-after=15 "$pytest_budget" "$PY" -m pytest -q -p no:cacheprovider 2>&1 | tee "$logs/pytest.log"
pytest_rc=${PIPESTATUS[0]}
echo "pytest exit status: $pytest_rc$( ((pytest_rc == 124)) && echo ' (stopped at its time budget)')" | tee -a "$logs/pytest.log"

left=$((budget - ($(date +%s) - start)))
bench_rc=1
if ((left > 120)); then
    echo "== benchmarks --quick (${left} s left) -> $results"
    timeout --signal=INT --kill-after=20 $((left - 15)) \
        "$PY" -m benchmarks --quick --no-progress --out "$results" --time-budget $((left - 75)) 2>&1 | tee "$logs/bench.log"
    bench_rc=${PIPESTATUS[0]}
else
    echo "== benchmarks skipped: only ${left} s left of the ${budget} s budget" | tee "$logs/bench.log"
fi

if [[ -n "${OUT:-}" && "$OUT" != "$results" ]]; then
    for f in results.json results.md; do
        [[ -f "$results/$f" ]] && cp "$results/$f" "$OUT/"
    done
    [[ -d "$results/plots" ]] && tar -czf "$OUT/plots.tar.gz" -C "$results" plots
fi

echo "== gpu-check done in $(($(date +%s) - start)) s: pytest exit $pytest_rc, benchmarks exit $bench_rc; results in $results"
((pytest_rc == 0 && bench_rc == 0))
