"""A conversation in the model's chat format whose history lives in the KV cache: each turn feeds only its new
tokens, through ``generate`` (generate.py) or, with a drafter, ``speculative_generate`` (speculative.py)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from llama3_triton.model.errors import UserError
from llama3_triton.model.generation.generate import GenerationOutput, generate
from llama3_triton.model.generation.sampling import SampleRng, SamplingParams
from llama3_triton.model.generation.speculative import speculative_generate

__all__ = ["ChatSession", "ContextFull"]


class ContextFull(UserError):
    """The next chat turn does not fit in the KV cache."""


class ChatSession:
    """A conversation in the model's chat format (Meta's Llama-3 format, or the checkpoint's own template for a
    Hugging Face tokenizer) whose history lives in the model's KV cache: each turn
    feeds only its new tokens. One random generator serves the whole session (seeded once), so a seed makes
    the session repeatable without making every reply start the same way.

    ``drafter`` (speculative.py's NgramDrafter or ModelDrafter): each reply is decoded speculatively, the drafter
    seeing the whole conversation; greedy replies are the same tokens, sampled ones the same distribution (drawn
    from the session's own torch.Generator, seeded from ``seed``)."""

    def __init__(self, model, *, system: str | None = None, seed: int | None = None, drafter=None,
                 draft_tokens: int = 4, **sampling):  # fmt: skip
        from llama3_triton.model.tokenizers.hf import chat_format

        self.model = model
        self.fmt = chat_format(model.tokenizer)
        self.system = system
        self.sampling = sampling  # generate()'s sampling keywords: temperature, top_p, top_k, min_p, penalties, stop
        # bad values fail here, not mid-chat
        self.params = SamplingParams(**{k: v for k, v in sampling.items() if k != "stop"})
        self.generator = SampleRng(seed, model.device)
        self.drafter, self.draft_tokens = drafter, draft_tokens
        if drafter is not None:
            self.draft_generator = torch.Generator(device=model.device)
            self.draft_generator.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, ()).item()))
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays); the random stream goes on."""
        self.pending: list[int] = self.fmt.encode_start(self.system)  # to feed before the next answer: BOS, system
        self.pos = 0  # tokens already in the KV cache
        self.history: list[int] = []  # those tokens (what a drafter looks back on)

    @property
    def context_left(self) -> int:
        """Tokens of the context not yet used by the conversation."""
        return self.model.max_seq_len - self.pos - len(self.pending)

    def reply(
        self,
        text: str,
        *,
        max_new_tokens: int = 128,
        on_text: Callable[[int, str], None] | None = None,
        interruptible: bool = False,
    ) -> GenerationOutput:
        """The assistant's answer to one user message. Stop reason "context_full" when the KV cache ran out
        before the answer ended; ``ContextFull`` when the message itself does not fit."""
        prompt = (
            self.pending
            + self.fmt.encode_message({"role": "user", "content": text})
            + self.fmt.encode_header("assistant")
        )
        room = self.model.max_seq_len - self.pos - len(prompt)
        if room < 1:
            raise ContextFull(
                f"the chat history ({self.pos + len(prompt)} tokens) is longer than the context of "
                f"{self.model.max_seq_len} tokens"
            )
        if self.drafter is not None:
            out = speculative_generate(
                self.model, prompt, self.drafter, max_new_tokens=min(max_new_tokens, room), params=self.params,
                stop=self.sampling.get("stop"), on_text=on_text, draft_tokens=self.draft_tokens,
                context=self.history, generator=self.draft_generator, interruptible=interruptible,
                keep_drafter=bool(self.history),  # the previous turn's sequence is a prefix of this one's
            )  # fmt: skip
        else:
            out = generate(
                self.model,
                [prompt],
                max_new_tokens=min(max_new_tokens, room),
                generator=self.generator,
                start_pos=self.pos,
                on_text=on_text,
                interruptible=interruptible,
                **self.sampling,
            )
        if out.stop_reasons[0] == "max_new_tokens" and room < max_new_tokens:
            out.stop_reasons[0] = "context_full"
        kept = out.tokens[0]
        # Every kept token but possibly the last was fed back through the model (the cache holds them). Stopped
        # on a stop token: all kept tokens are cached. Otherwise the last may not be: feed it again next turn
        # (the cache is indexed by position, so feeding it twice writes the same slot with the same values).
        unfed = [] if out.stop_reasons[0] == "stop_token" else kept[-1:]
        self.pos += len(prompt) + len(kept) - len(unfed)
        self.history += prompt + kept[: len(kept) - len(unfed)]
        self.pending = unfed + self.fmt.end_of_turn()
        return out
