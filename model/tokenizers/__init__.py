"""Tokenizers: text to token ids and back, and chat formats.

llama3.py    Llama-3's tiktoken tokenizer (the ``tokenizer.model`` file), streaming detokenization
hf.py        Hugging Face tokenizers (``tokenizer.json``, or a GGUF's token list), chat templates rendered in
             Jinja's sandbox, and ``load_tokenizer``: the tokenizer that belongs to a checkpoint
"""
