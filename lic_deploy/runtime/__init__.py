"""Runtime side: codec packages, engines (ONNX Runtime, TensorRT, PyTorch reference) and the codec itself."""
