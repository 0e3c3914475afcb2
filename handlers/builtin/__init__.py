"""Built-in handlers used when the model folder has weights but no model.py."""
