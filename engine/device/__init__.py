"""On the device: micro-batches (batching) under a token budget (budget), the device loop (pipeline), the host
copy of pooled outputs (transfer)."""
