"""Shrink a model for deployment: structured pruning, int8 quantization, distillation."""
