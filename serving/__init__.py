"""HTTP front, configuration, request queueing and model-worker supervision (never imports torch)."""
