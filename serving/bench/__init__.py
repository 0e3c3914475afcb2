"""``lmi bench``: load-test an LLM endpoint (LMI, OpenAI-compatible, TGI); report latency and throughput.

Kept import-light: the CLI module is imported by ``lmi`` itself, so aiohttp, transformers and torch are
only imported when a benchmark actually runs.
"""
