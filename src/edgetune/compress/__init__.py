"""Compression of a fine-tuned causal LM for edge inference: structured pruning and quantization.

`compress/prune/` removes whole units (MLP channels, key/value head groups) so the saved model
is physically smaller; `compress/quantize.py` stores linear weights in int8 (a frozen base
that LoRA can still train on) and `compress/int8_folder.py` saves and loads such a model.
"""
