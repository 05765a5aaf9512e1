"""What the model checks of a caller's input before a step: token ids and positions, one line per failure.

A step trusts its inputs (no host sync inside the layer loop); ``Llama.forward`` and ``Llama.prefill`` check
them here first. Generation, the engine and the benchmarks make their own inputs and call the unchecked steps.
"""

from __future__ import annotations

import torch

from llama3_triton.model.errors import UserError, shown


def check_inputs(model, tokens, start_pos) -> tuple[torch.Tensor, torch.Tensor, int | None]:
    """``Llama.forward``'s and ``prefill``'s checks of tokens (B, T) and start_pos (an int, or a (B,) tensor for a
    one-token step): (tokens as int64, positions (B, T) on the device, start_pos, None for per-sequence positions).
    Each failure is one UserError line saying what was given and what fits."""
    if not torch.is_tensor(tokens) or tokens.ndim != 2 or tokens.dtype not in (torch.int32, torch.int64):
        raise UserError(f"tokens must be an integer tensor of shape (B, T), got {described(tokens)}")
    if tokens.device != model.device:
        raise UserError(f"tokens are on {tokens.device}, the model is on {model.device}")
    B, T = tokens.shape
    if not 1 <= B <= model.max_batch_size:
        raise UserError(f"batch size {B} must be in [1, max_batch_size={model.max_batch_size}]")
    if T < 1:
        raise UserError("tokens must hold at least one position (T >= 1)")
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= model.args.vocab_size:
        raise UserError(f"token ids must be in [0, {model.args.vocab_size}), got range [{lo}, {hi}]")
    steps = torch.arange(T, device=model.device)
    if isinstance(start_pos, bool):
        raise UserError(f"start_pos must be an int or an integer tensor, got {shown(start_pos)}")
    if isinstance(start_pos, int):
        if start_pos < 0 or start_pos + T > model.max_seq_len:
            raise UserError(
                f"start_pos={start_pos}: positions {start_pos}..{start_pos + T - 1} do not fit the KV cache of "
                f"{model.max_seq_len}"
            )
        return tokens.long(), (start_pos + steps).expand(B, T), start_pos
    if not torch.is_tensor(start_pos) or start_pos.shape != (B,) or start_pos.is_floating_point():
        raise UserError(f"start_pos must be an int or an integer tensor of shape ({B},), got {described(start_pos)}")
    if T != 1:
        raise UserError("per-sequence start_pos (a tensor) is only supported for one-token decode steps (T == 1)")
    start_pos = start_pos.to(model.device, torch.long)
    if int(start_pos.min()) < 0 or int(start_pos.max()) >= model.max_seq_len:
        raise UserError(f"start_pos values must be in [0, {model.max_seq_len}), got {start_pos.tolist()}")
    return tokens.long(), start_pos[:, None], None


def described(x) -> str:
    """A value as an error message names it: a tensor by dtype and shape, anything else by repr."""
    if torch.is_tensor(x):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return repr(x)
