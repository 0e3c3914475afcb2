"""An LM head that reads 8-bit weights per token and still ranks its best tokens with the float weights.

The head is the largest single matrix a decoded token reads: SmolLM2-135M's tied 49,152 x 576
embedding is 57 MB of bf16 per token, a third of an int8 model's bytes. Held as int8 it reads half
as much, but int8 alone moves near-ties: on the default model an int8 head took int8's top-1
agreement with bf16 from 95.2 % to 94.4-94.8 % (engines.quant.apply.HEAD_ACTIVATION_BITS). Here the
int8 logits only choose each row's ``CANDIDATES`` best tokens, which are scored again with the float
weights (for a tied head the embedding table, which lookups keep anyway): the argmax and the top of
the distribution are the float head's, the tail is within int8's error.
"""

from __future__ import annotations

import torch
from torch import nn

from engines.quant import kernels
from engines.quant.linear import QuantizedLinear
from engines.quant.methods import quantize_int8

CANDIDATES = 64
"""Tokens per row rescored exactly. The float head's argmax falls outside int8's top 64 only if int8's
error exceeded the gap between the 1st and 65th logit, many times its size on the default model."""


class RescoredHead(nn.Module):
    """logits = the int8 head's, with each row's top ``candidates`` replaced by the float head's values."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        dtype: torch.dtype,
        candidates: int = CANDIDATES,
    ) -> None:
        """weight: the float head [vocab (shard), hidden], kept by reference (a tied embedding is shared)."""
        super().__init__()
        self.approximate = QuantizedLinear(quantize_int8(weight.detach()), bias, dtype)
        self.register_buffer("exact", weight.detach(), persistent=False)
        self.bias = self.approximate.bias
        self.candidates = min(candidates, weight.shape[0])
        self.method = "int8"

    @property
    def kernel(self) -> str:
        return self.approximate.kernel

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """[n, hidden] -> [n, vocab] in the model's dtype.

        The candidates come from the native kernel's one-pass selection (torch.topk took 2.7 ms for 64
        rows here, as long as the int8 head itself), and are written back through a flat index_put_
        (scatter_ took 0.6 ms for the same 4,096 values)."""
        logits = self.approximate(hidden)
        if logits.shape[0] == 0:  # a step that samples nothing (a long prompt's middle chunk)
            return logits
        count, vocab = self.candidates, logits.shape[1]
        top = kernels.native_module().top_candidates(logits, count)  # [n, candidates]
        flat = (top + torch.arange(0, logits.shape[0] * vocab, vocab)[:, None]).flatten()
        rows = self.exact.index_select(0, top.flatten()).view(*top.shape, self.exact.shape[1])
        # in float32: bf16's bmm took 34 us for one row here, float32's 13 (64 rows: 0.53 against
        # 0.64 ms, 0.1 % of such a step), and it rounds once, at the end
        exact = torch.bmm(rows.float(), hidden.float().unsqueeze(-1)).squeeze(-1)
        if self.bias is not None:
            exact = exact + self.bias[top]
        return logits.view(-1).index_put_((flat,), exact.to(logits.dtype).flatten()).view_as(logits)

    def expected(self, hidden: torch.Tensor) -> torch.Tensor:
        """The plain-torch result (tests): the int8 reference with the same rows' top tokens rescored
        in float64 from the float weights."""
        logits = self.approximate.expected(hidden)
        top = logits.topk(self.candidates, dim=-1, sorted=False).indices
        exact = torch.einsum("nch,nh->nc", self.exact[top].double(), hidden.double())
        if self.bias is not None:
            exact = exact + self.bias[top].double()
        return logits.scatter(1, top, exact.to(logits.dtype))

    def pack(self, keep_weight: bool = False) -> bool:
        """Already in the kernel's layout (the model packs every projection after loading)."""
        return True

    def weight_bytes(self) -> int:
        """The bytes a token reads: the int8 head (the float rows read are a few candidates' worth)."""
        return self.approximate.weight_bytes()
