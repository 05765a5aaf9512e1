"""Compile every Triton kernel configuration for real GPUs, without one, and read its resources.

Each ``kernels/<op>.py`` lists, in ``compile_variants()``, every configuration its launcher or autotuner
can pick. This script compiles each for sm_80 (A100) and sm_90 (H100) with Triton's bundled ptxas and
reads from the cubin, with the bundled ``cuobjdump``: registers per thread, spills and stack frames in local memory,
and, for the kernels with a matrix product, whether the SASS uses the tensor cores (HMMA; on sm_90 also the
warpgroup HGMMA; only those are disassembled, ~0.6 s each). Dynamic shared memory
comes from the compiler's metadata (cuobjdump's SHARED column only shows static shared memory).

    python -m llama3_triton.benchmarks.kernel_resources            # a table
    python -m llama3_triton.benchmarks.kernel_resources --json F   # and the rows as JSON (the compile gate reads it)
    python -m llama3_triton.benchmarks.kernel_resources --only pages   # the variants whose names contain "pages"

Run it without TRITON_INTERPRET=1: under the interpreter, @triton.jit functions cannot be compiled.

From the registers and shared memory it also predicts residency: how many programs (CTAs) of a configuration fit
on one SM at once. For the kernels that stream a weight (the GEMVs: a variant's ``stream_bytes`` per pipeline
stage) that gives the weight bytes each SM keeps in flight, CTAs x (stages - 1) x stream_bytes, which by Little's
law bounds the bandwidth: an H100/H200 (sm_90) needs about 4.8 TB/s x ~0.7 us / 132 SMs ~ 25 KB a SM to run at
its bandwidth, an A100 (sm_80) 2.0 TB/s x ~0.6 us / 108 ~ 11 KB (spec-sheet bandwidths, a loaded-DRAM latency
assumed, not measured here). The gate asks for 24 KB and 12 KB. A prediction from the compiler's output, not a
timing: it catches a configuration that cannot reach the bandwidth, not one that does.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from llama3_triton.model.checkpoints import files as _files

KERNEL_MODULES = [
    "llama3_triton.kernels.rmsnorm",
    "llama3_triton.kernels.rope",
    "llama3_triton.kernels.swiglu",
    "llama3_triton.kernels.attention",
    "llama3_triton.kernels.decode",
    "llama3_triton.kernels.decode_step",
    "llama3_triton.kernels.paged_attention",
    "llama3_triton.kernels.gemv",
    "llama3_triton.kernels.quant",
]
ARCHS = [80, 90]


def gate_archs() -> list[int]:
    """The archs compiled for: ARCHS, or those of ARCHS named in $LLAMA3_TRITON_GATE_ARCHS ("90", "80,90"). CI's
    image environment names 90: it replicates the lent GPU machine (H100/H200, sm_90) and its triton, and the gate
    is a quarter of the suite's time; the README's environment compiles both."""
    named = os.environ.get("LLAMA3_TRITON_GATE_ARCHS", "").replace(" ", "")
    if not named:
        return list(ARCHS)
    archs = [int(a) for a in named.split(",") if a.isdigit() and int(a) in ARCHS]
    if not archs:
        raise SystemExit(f"LLAMA3_TRITON_GATE_ARCHS={named!r}: expected some of {ARCHS}, comma-separated")
    return archs


# Opt-in shared memory per block: A100 163 KB (sm_80), H100 227 KB (sm_90).
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
TENSOR_CORE_OPS = {80: ("HMMA",), 90: ("HMMA", "HGMMA")}
# Per SM: shared memory for resident CTAs (1 KB of it reserved per CTA), and the weight bytes a streaming kernel
# must keep in flight (see the docstring). Both archs: 64K registers, 64 warps and 32 CTAs at most.
SHARED_PER_SM = {80: 164 * 1024, 90: 228 * 1024}
MIN_IN_FLIGHT = {80: 12 * 1024, 90: 24 * 1024}


def ctas_per_sm(arch: int, num_warps: int, registers: int, shared_bytes: int) -> int:
    """Programs of a compiled kernel resident on one SM at once: the least of the warp, register (allocated per
    warp in units of 256, i.e. 8 a thread) and shared-memory limits."""
    regs = -(-max(registers, 1) // 8) * 8
    return min(64 // num_warps, 65536 // (num_warps * 32 * regs), SHARED_PER_SM[arch] // (shared_bytes + 1024), 32)


def _cuobjdump() -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def compile_one(module: str, index: int, arch: int) -> dict:
    """Compile variant ``index`` of ``module`` for sm_``arch``; return its resource row."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    v = importlib.import_module(module).compile_variants()[index]
    row = {"module": module, "name": v["name"], "arch": f"sm_{arch}", "num_warps": v["num_warps"]}
    row["num_stages"] = v["num_stages"]
    try:
        # At launch Triton marks pointers aligned to 16 bytes (every torch allocation, and the views the
        # driver passes) and integers divisible by 16 as such, which is what enables 16-byte vector loads;
        # each variant's "attrs" (kernels/_launch.variant) says which, so the gate compiles what runs.
        attrs = v["attrs"]
        src = ASTSource(fn=v["fn"], signature=v["signature"], constexprs=v.get("constexprs", {}), attrs=attrs)
        options = {"num_warps": v["num_warps"], "num_stages": v["num_stages"]}
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as e:  # a config that does not compile is exactly what the gate must report
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
        return row
    row["shared_bytes"] = int(compiled.metadata.shared)
    # A kernel with a matrix product (tt.dot in its Triton IR, helpers inlined) on fp16/bf16 data must put
    # it on the tensor cores (fp32 variants, kept for tests, use input_precision="ieee": exact FMA, no TF32).
    half = any(t in ("*fp16", "*bf16") for t in v["signature"].values())
    row["uses_dot"] = half and "tt.dot" in compiled.asm["ttir"]
    # Local memory can be used without a spill (a stack array that libdevice's sin/cos slow path keeps, say), and
    # -res-usage reports both kinds: the frame (STACK) and the spilled or local bytes (LOCAL). An STL/LDL needs one
    # of them, so the sizes are the check for every row. Disassembling costs ~0.6 s a cubin, a third of the gate's
    # time: the SASS is read where it is needed, for the tensor-core instructions of a kernel with a dot, and there
    # the STL/LDL instructions are counted as well.
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        res = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
        sass = None
        if row["uses_dot"]:
            sass = subprocess.run([_cuobjdump(), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", res)
    if m is None:
        row["error"] = f"could not parse cuobjdump -res-usage output: {res.strip()[:200]}"
        return row
    row["registers"], row["stack_bytes"], row["static_shared_bytes"], row["local_bytes"] = map(int, m.groups())
    if sass is not None:
        row["tensor_core_ops"] = sorted({op for op in ("HMMA", "HGMMA") if re.search(rf"\b{op}\b", sass)})
        row["local_memory_ops"] = len(re.findall(r"\b(?:STL|LDL)(?:\.\w+)*\b", sass))
    row["ctas_per_sm"] = ctas_per_sm(arch, v["num_warps"], row["registers"], row["shared_bytes"])
    if "stream_bytes" in v:
        row["in_flight_bytes"] = row["ctas_per_sm"] * max(v["num_stages"] - 1, 1) * v["stream_bytes"]
    return row


def all_variants() -> list[tuple[str, int, list[int]]]:
    """(module, index, archs): a variant may name the archs its launcher picks it for (an autotune config
    pruned on sm_80, say); the others are compiled for every arch in ARCHS."""
    out = []
    for module in KERNEL_MODULES:
        variants = importlib.import_module(module).compile_variants()
        wanted = gate_archs()
        for i, v in enumerate(variants):
            archs = [a for a in v.get("archs", ARCHS) if a in wanted]
            if archs:
                out.append((module, i, archs))
    return out


def problems(row: dict) -> list[str]:
    """Why a compiled configuration fails the gate (empty when it passes)."""
    if "error" in row:
        return [f"does not compile: {row['error']}"]
    arch = int(row["arch"].removeprefix("sm_"))
    out = []
    if row["local_bytes"] or row["stack_bytes"] or row.get("local_memory_ops"):
        out.append(
            f"local memory: {row['local_bytes']} B spilled, {row['stack_bytes']} B stack frame per thread, "
            f"{row.get('local_memory_ops', 0)} STL/LDL instructions"
        )
    if row["shared_bytes"] > SHARED_LIMIT[arch]:
        out.append(f"shared memory {row['shared_bytes']} B exceeds the {SHARED_LIMIT[arch]} B limit of {row['arch']}")
    if row["uses_dot"] and not set(row["tensor_core_ops"]) & set(TENSOR_CORE_OPS[arch]):
        out.append(f"no tensor-core instruction ({'/'.join(TENSOR_CORE_OPS[arch])}) in the SASS")
    if row.get("in_flight_bytes", MIN_IN_FLIGHT[arch]) < MIN_IN_FLIGHT[arch]:
        out.append(
            f"{row['in_flight_bytes'] // 1024} KB of weight in flight per SM ({row['ctas_per_sm']} CTAs resident), "
            f"below the {MIN_IN_FLIGHT[arch] // 1024} KB its bandwidth needs"
        )
    return out


def _job(args):
    return compile_one(*args)


def run(jobs: int = 2, progress: bool = True, only: list[str] | None = None) -> list[dict]:
    """Compile every variant (or those whose ``module name`` contains one of ``only``'s substrings)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("error: unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    tasks = [(m, i, a) for m, i, archs in all_variants() for a in archs]
    if only:
        names = {(m, i): f"{m} {importlib.import_module(m).compile_variants()[i]['name']}" for m, i, _ in tasks}
        tasks = [t for t in tasks if any(o in names[t[0], t[1]] for o in only)]
    # Each compile takes seconds (ptxas on the autotuner's largest tiles): say what is happening, and how far.
    log = (lambda line: print(line, file=sys.stderr, flush=True)) if progress else (lambda line: None)
    log(
        f"compiling {len(tasks)} kernel configurations for sm_{'/sm_'.join(map(str, gate_archs()))} with {jobs} "
        "process(es)"
    )
    from tqdm import tqdm

    bar = tqdm(total=len(tasks), unit="config", file=sys.stderr, disable=not (progress and sys.stderr.isatty()))
    rows, step = [], max(len(tasks) // 10, 1)

    def done(row: dict) -> None:
        rows.append(row)
        bar.update(1)
        if not sys.stderr.isatty() and (len(rows) % step == 0 or len(rows) == len(tasks)):
            log(f"  {len(rows)}/{len(tasks)} compiled ({row['module'].removeprefix('kernels.')} {row.get('name', '')})")

    try:
        if jobs <= 1:
            for t in tasks:
                done(compile_one(*t))
        else:
            with ProcessPoolExecutor(jobs) as pool:
                for row in pool.map(_job, tasks):
                    done(row)
    finally:
        bar.close()
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| kernel | config | arch | warps | stages | regs | shared B | spills B | stack B | tensor cores | CTAs/SM "
        "| in flight KB/SM | gate |",
        "|" + "---|" * 13,
    ]
    for r in rows:
        bad = problems(r)
        if "error" in r:
            lines.append(f"| {r['module']} | {r['name']} | {r['arch']} | | | | | | | | | | FAIL: {bad[0]} |")
            continue
        in_flight = f"{r['in_flight_bytes'] / 1024:.0f}" if "in_flight_bytes" in r else "-"
        lines.append(
            f"| {r['module'].removeprefix('kernels.')} | {r['name']} | {r['arch']} "
            f"| {r['num_warps']} | {r['num_stages']} "
            f"| {r['registers']} | {r['shared_bytes']} | {r['local_bytes']} | {r['stack_bytes']} "
            f"| {','.join(r.get('tensor_core_ops', [])) or '-'} | {r['ctas_per_sm']} | {in_flight} "
            f"| {'ok' if not bad else 'FAIL: ' + '; '.join(bad)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, help="also write the rows as JSON to this file")
    p.add_argument("--jobs", type=int, default=2, help="compile processes (default 2)")
    p.add_argument(
        "--only",
        action="append",
        metavar="SUBSTR",
        help="compile only the variants whose 'module name' contains SUBSTR (repeatable; e.g. --only _paged "
        "--only kernels.paged_attention); the compile gate runs them all",
    )
    a = p.parse_args(argv)
    rows = run(a.jobs, only=a.only)
    print(table(rows))
    if a.json:
        _files.write_text(a.json, json.dumps(rows, indent=1))  # whole or not at all
    failed = sum(bool(problems(r)) for r in rows)
    print(f"\n{len(rows)} compiled configurations, {failed} failing the gate", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
