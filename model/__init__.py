"""The Llama-3 driver: checkpoints, tokenizer, the model, generation and the command line."""

from model.llama import Llama

__all__ = ["Llama"]
