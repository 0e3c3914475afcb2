"""Native CPU kernels, compiled on first use and cached; each sits next to its plain-torch reference."""
