"""Weight-only quantization: fewer bytes a weight, a proportionally lower floor for a decode step.

quantize.py   int8 per channel, int4 in groups (scale + offset searched per group), GGUF blocks kept as they
              are; QuantLinear, a product that runs the dequantizing GEMV; bytes per token and floors
calibrate.py  GPTQ's calibration pass: a text's inputs to each product choose its int4 codes
"""
