"""Fine-tuning on the device through an exported runtime alone (ONNX Runtime, ExecuTorch)."""
