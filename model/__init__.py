"""The Llama-3 driver: checkpoints, tokenizer, the model, generation and the command line."""

__all__ = ["Llama"]


def __getattr__(name: str):
    # Imported on first use (PEP 562), so `llama3-triton --help` and `--version` start without torch.
    if name == "Llama":
        from model.llama import Llama

        return Llama
    raise AttributeError(f"module 'model' has no attribute {name!r}")
