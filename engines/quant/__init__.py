"""Weight-only quantization of the native engine's projections (``option.quantize``).

``methods`` turns a weight into its quantized form and back (the plain-torch reference), ``linear`` is
the projection that computes with the quantized weights through native kernels, and ``apply``
replaces a loaded model's projections.
"""
