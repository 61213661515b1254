"""Function-preserving rewrites before calibration: Hadamard rotation of the residual stream and heads."""
