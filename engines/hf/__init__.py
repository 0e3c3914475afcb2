"""Hugging Face transformers engine: local safetensors or GGUF checkpoints served per HF task."""
