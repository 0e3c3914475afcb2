"""What the follower fork server (engines.parallel.spawn) imports once, so that a forked rank starts
loading weights at once: torch, torch.distributed, safetensors, transformers' config and tokenizer
classes (the configs of every architecture the native engine runs), and the engine's own modules.
Importing computes nothing: the server stays safe to fork (no OpenMP team, no CUDA context)."""

import safetensors.torch  # noqa: F401
import torch.distributed  # noqa: F401
import transformers.models.llama.configuration_llama  # noqa: F401
import transformers.models.mistral.configuration_mistral  # noqa: F401
import transformers.models.qwen2.configuration_qwen2  # noqa: F401
from transformers import AutoConfig, AutoTokenizer  # noqa: F401

import engines.kernels.ops  # noqa: F401
import engines.llama.weights  # noqa: F401
import engines.parallel.comm  # noqa: F401
import engines.parallel.group  # noqa: F401
import engines.parallel.partition  # noqa: F401
import engines.quant.prequantized  # noqa: F401
import engines.rolling.factory  # noqa: F401
