"""Block-by-block calibration with ONNX Runtime: block models, the runner, input statistics, calibration text."""
