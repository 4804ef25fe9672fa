"""Data loading: tokenizer, SFT records, batching."""
