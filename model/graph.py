"""The decode step as a CUDA graph: recorded once per batch size, replayed for every token.

At batch 1 a step's kernels take microseconds each, and launching them one by one from Python would cost more
than running them; a replayed graph launches the whole step at once. ``Llama.decode`` captures and replays it,
one graph per batch size (``DecodeGraphs``).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn


class DecodeGraph:
    """The decode step recorded once as a CUDA graph for a batch size, replayed for every token.

    Inputs are copied into static buffers; the graph reads them, writes the KV cache in place and
    leaves the logits in a static output buffer.
    """

    def __init__(self, graph, tokens, positions, logits):
        self.graph, self.tokens, self.positions, self.logits = graph, tokens, positions, logits

    @classmethod
    def capture(cls, model: nn.Module, tokens: torch.Tensor, positions: torch.Tensor) -> DecodeGraph | None:
        static_tokens, static_pos = tokens.clone(), positions.clone()
        try:
            # Warm up on a side stream (autotuning, lazy init) with the real inputs: writing the same
            # k/v into the same cache slot twice is harmless.
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    model._decode_step(static_tokens, static_pos)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                logits = model._decode_step(static_tokens, static_pos)
            return cls(graph, static_tokens, static_pos, logits)
        except Exception as e:  # capture is an optimisation: fall back to eager, say so once
            warnings.warn(f"CUDA graph capture failed, decoding eagerly: {type(e).__name__}: {e}", stacklevel=3)
            return None

    def replay(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if tokens.data_ptr() != self.tokens.data_ptr():
            self.tokens.copy_(tokens)
        if positions.data_ptr() != self.positions.data_ptr():
            self.positions.copy_(positions)
        self.graph.replay()
        return self.logits

    def replay_static(self) -> torch.Tensor:
        """A step on whatever the static buffers hold (the caller wrote them, on the device)."""
        self.graph.replay()
        return self.logits


class DecodeGraphs:
    """The model's captured decode steps, one per batch size, each captured on its first step; None for a batch
    size whose capture failed (those steps run eagerly). ``Llama.use`` clears them: they hold the kernels and
    workspaces they were captured with."""

    def __init__(self):
        self._by_batch: dict[int, DecodeGraph | None] = {}

    def clear(self) -> None:
        self._by_batch.clear()

    def captured(self, batch: int) -> bool:
        return self._by_batch.get(batch) is not None

    def get(self, model: nn.Module, tokens: torch.Tensor, positions: torch.Tensor) -> DecodeGraph | None:
        """The graph for tokens' batch size, captured now (running ``model._decode_step`` on these inputs) if this
        is its first step. Under tensor parallelism every rank replays a graph or every rank runs eagerly, so
        their collectives match: one failed capture makes every rank eager for that batch size."""
        batch = tokens.shape[0]
        if batch not in self._by_batch:
            graph = DecodeGraph.capture(model, tokens, positions)
            tp = model.tp
            if tp.enabled:
                ok = torch.tensor([int(graph is not None)], device=tokens.device)
                tp.all_reduce(ok)
                if int(ok) != tp.world:
                    graph = None
            if graph is not None:  # after the ranks agreed (the step holds collectives): capturing ran nothing, so
                graph.graph.replay()  # now the logits buffer holds this step's, not the allocator's leftovers
            self._by_batch[batch] = graph
        return self._by_batch[batch]
