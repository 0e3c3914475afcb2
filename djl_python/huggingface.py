"""DJL module name for the built-in Hugging Face handler."""

from handlers.builtin.huggingface import create_handler, handle

__all__ = ["create_handler", "handle"]
