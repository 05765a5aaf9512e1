"""A live server for the tests: ``llama3-triton serve`` started through its console script, in a fresh process with
a clean environment, on a free loopback port (``--port 0``: the port it prints), on a tiny random checkpoint."""

from __future__ import annotations

import pytest
import torch

from tests.model.server.harness import API_KEY, CONTEXT, Server


@pytest.fixture(scope="module")
def server(tiny_ckpt, tmp_path_factory):
    s = Server(tiny_ckpt, "--api-key", API_KEY, "--max-num-seqs", "40", "--max-num-batched-tokens", "256",
               "--kv-cache-tokens", "16384", home=tmp_path_factory.mktemp("home"))  # fmt: skip
    yield s
    assert s.stop() == 0, "".join(s.lines[-30:])


@pytest.fixture(scope="module")
def llm(tiny_ckpt):
    """The same checkpoint in this process: the reference for tokens, counts and log-probabilities."""
    from llama3_triton.model.llama import Llama

    return Llama.load(tiny_ckpt, backend="torch", device="cpu", dtype=torch.float32, max_seq_len=CONTEXT)


@pytest.fixture
def openai_client(server):
    openai = pytest.importorskip("openai", reason="the openai client (dev extras; not on the GPU image)")
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
