"""The Llama-3 driver: checkpoints, tokenizer, the model, generation and the command line."""

from model import _kernels_name

_kernels_name.bind()  # `import kernels` is this project's, not Hugging Face's package of the same name

__all__ = ["Llama"]


def __getattr__(name: str):
    # Imported on first use, not with the package: the command line (model.cli) starts without importing
    # torch, so a Ctrl-C in its first second meets main()'s handler (exit 130, no traceback).
    if name == "Llama":
        from model.llama import Llama

        return Llama
    raise AttributeError(f"module 'model' has no attribute {name!r}")
