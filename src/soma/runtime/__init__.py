"""The local engine: plans, executor, cache, hashing, events and batching helpers."""
