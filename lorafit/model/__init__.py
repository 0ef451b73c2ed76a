"""Everything that knows transformers: loading, the architecture table, injection, 4-bit weights, the loss head."""
