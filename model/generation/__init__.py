"""Generation: from a prompt to text, on the model's public steps (prefill, decode).

generate.py     the decode loop (ragged batches, stop tokens and strings, streaming, no host sync per token on
                CUDA)
sampling.py     temperature, top-k, top-p (a radix select, no sort), min-p, penalties; a counter-based generator
speculative.py  speculative decoding: drafts verified in one pass, the rejection rule
chat.py         the chat session: a conversation's history in the KV cache, turn after turn
"""
