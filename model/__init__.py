"""The Llama-3 driver: the network (``llama``), its configuration and loading, and one sub-package per seam.

    checkpoints/   Meta and Hugging Face folders, GGUF files, hub names, bounded safe reads
    tokenizers/    Llama-3's tiktoken tokenizer, Hugging Face tokenizers, chat templates, streaming detokenization
    generation/    the decode loop, sampling, the chat session
    quant/         int8/int4/GGUF weight layouts, GPTQ calibration, bytes and floors
    cli/           the ``llama3-triton`` command line
    tools/         the tiny-checkpoint writer, explain

``from llama3_triton.model import Llama`` is the public entry point.
"""

__all__ = ["Llama"]


def __getattr__(name: str):
    # Imported on first use, not with the package: the command line (model.cli) starts without importing
    # torch, so a Ctrl-C in its first second meets main()'s handler (exit 130, no traceback).
    if name == "Llama":
        from llama3_triton.model.llama import Llama

        return Llama
    raise AttributeError(f"module 'llama3_triton.model' has no attribute {name!r}")
