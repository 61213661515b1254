"""What the solved weights become in ONNX: MatMulNBits, QDQ, GatherBlockQuantized; bit packing; target limits."""
