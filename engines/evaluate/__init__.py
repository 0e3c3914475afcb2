"""``lmi eval``: what a change of options (quantization, dtype, another checkpoint) costs in quality and
buys in speed, measured against the baseline on the same inputs in one run.

``quality`` compares next-token distributions (KL divergence, top-1 agreement), perplexity and
multiple-choice accuracy; ``speed`` times decode and the first token. The CLI (serving/eval_cli.py)
prints both and turns thresholds into an exit code.
"""
