"""What is known about model families, derived from tensor names and config.json in one place: transformer-layer
indices, layer counts, embeddings and tied weights. Later: permutation specs (alignment) and MoE layouts."""
