"""Tools around the model: ``tiny.py`` writes tiny random checkpoints (Meta's and Hugging Face's layouts) for the
tests, the benchmarks and the first run; ``explain.py`` walks one prompt through the forward pass, step by step."""
