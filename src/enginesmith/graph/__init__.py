"""Graph passes, inspection and compatibility reports on ONNX models."""
