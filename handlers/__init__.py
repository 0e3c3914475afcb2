"""Request/response types and built-in handlers that model code runs against."""
