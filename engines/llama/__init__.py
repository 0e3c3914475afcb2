"""A native Llama-family model (Llama, Mistral, Qwen2, SmolLM) for batched decoding over a slot KV cache."""
