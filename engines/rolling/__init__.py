"""Continuous-batching text generation: sequences, sampling, detokenisation and the engine loop."""
