"""What is in a graph: linear layers, decoder blocks, attention subgraphs, gated MLPs (imports onnxq.graph only)."""
