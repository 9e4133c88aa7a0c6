"""Model runner: input preparation, sampling, CUDA graphs and KV tensors (torch)."""
