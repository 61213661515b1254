"""The one graph layer: load/save with lazy weights, names, weightless shape inference, normalize, provenance."""
