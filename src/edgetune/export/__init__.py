"""Export to edge runtimes: ONNX, ExecuTorch, GGUF (llama.cpp)."""
