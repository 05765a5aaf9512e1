"""DecodeGraphs' bookkeeping, on a CPU: one capture per batch size, a failed capture remembered as eager, and under
tensor parallelism one rank's failure makes every rank eager (their collectives must match). The capture itself
needs CUDA (tests/model/test_model_triton.py's GPU tests); here it is replaced by a stand-in."""

import types

import torch

from llama3_triton.model import graph as graph_mod
from llama3_triton.model.graph import DecodeGraphs


def _model(world: int = 1, others_ok: int = 0):
    def all_reduce(t):  # the sum over ranks: this rank's value plus the other ranks' successes
        t += others_ok
        return t

    return types.SimpleNamespace(tp=types.SimpleNamespace(enabled=world > 1, world=world, all_reduce=all_reduce))


def _capturing(monkeypatch, results):
    calls = []

    def capture(model, tokens, positions):
        calls.append(tokens.shape[0])
        return results.pop(0)

    monkeypatch.setattr(graph_mod.DecodeGraph, "capture", staticmethod(capture))
    return calls


class _Graph:
    """A stand-in DecodeGraph whose CUDA graph counts its replays."""

    def __init__(self):
        self.graph = self
        self.replays = 0

    def replay(self):
        self.replays += 1


def test_one_capture_per_batch_size_and_a_failure_stays_eager(monkeypatch):
    g1, g4 = _Graph(), _Graph()
    calls = _capturing(monkeypatch, [g1, None, g4])
    graphs, model = DecodeGraphs(), _model()
    one, two, four = (torch.zeros(b, 1, dtype=torch.long) for b in (1, 2, 4))
    pos = torch.zeros(1, dtype=torch.long)
    assert graphs.get(model, one, pos) is g1 and graphs.get(model, one, pos) is g1
    assert graphs.get(model, two, pos) is None and graphs.get(model, two, pos) is None  # failed once: eager
    assert graphs.get(model, four, pos) is g4
    assert calls == [1, 2, 4]
    assert g1.replays == g4.replays == 1  # once, right after the capture: the logits buffer holds real values
    assert graphs.captured(1) and not graphs.captured(2) and graphs.captured(4) and not graphs.captured(8)
    graphs.clear()
    assert not graphs.captured(1)


def test_under_tensor_parallelism_one_failed_rank_makes_every_rank_eager(monkeypatch):
    """The first replay (the step's collectives) comes after the ranks agree: a rank whose peer failed never
    replays, or its all-reduces would wait for a rank that runs eagerly."""
    ok, alone = _Graph(), _Graph()
    _capturing(monkeypatch, [ok, alone])
    tokens, pos = torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, dtype=torch.long)
    assert DecodeGraphs().get(_model(world=2, others_ok=1), tokens, pos) is ok  # both ranks captured
    assert DecodeGraphs().get(_model(world=2, others_ok=0), tokens, pos) is None  # the other rank failed
    assert ok.replays == 1 and alone.replays == 0


def test_setup_pages_drops_the_captured_steps(tiny_ckpt):
    """The engine's page pools come with a new workspace (and maybe a longer RoPE table): a step captured before
    would replay into freed memory, so setting them up drops every captured step."""
    from llama3_triton.model.llama import Llama

    llm = Llama.load(tiny_ckpt, backend="torch", device="cpu", dtype=torch.float32, max_seq_len=40)
    llm._graphs._by_batch[1] = object()  # as if a step of batch 1 had been captured
    llm.setup_pages(8, 16)
    assert not llm._graphs.captured(1)
    assert llm.rope_cos_sin.shape[0] == 48  # 40 positions rounded up to whole pages of 16
