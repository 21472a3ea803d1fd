"""Shared by every stage: config schema, errors, atomic I/O and hashing, model loading, shards."""
