"""Our own layers for HF models: the paged KV cache tensors, paged attention and the CPU linear layer."""
