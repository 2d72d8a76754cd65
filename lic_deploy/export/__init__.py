"""Export side: checkpoint -> ONNX stages (FP32, FP16, INT8 Q/DQ), calibration, integer entropy model."""
