"""The shared-memory collectives of a CPU tensor-parallel group: sums and gathers equal to the plain
rank-order computation on every rank, across many back-to-back calls of changing sizes (the two
alternating slot sets must never be overwritten while a slower rank still reads them)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from engines.parallel.shm import SLOT_BYTES, ShmGroup

CALLS = 300


RANK_SCRIPT = """
import sys, torch
from pathlib import Path
from engines.parallel.shm import ShmGroup
path, ranks, rank, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
torch.set_num_threads(1)
group = ShmGroup(Path(path), ranks, rank, create=False)
results = []
for call in range(int(sys.argv[5])):
    generator = torch.Generator().manual_seed(call * 100 + rank)
    tensor = torch.randn(1 + (call * 7) % 13, 24, generator=generator)
    if call % 3 == 2:
        results.append(group.all_gather_last(tensor).clone())
    else:
        results.append(group.all_reduce(tensor).clone())
torch.save(results, out)
"""


def _inputs(rank: int, call: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(call * 100 + rank)
    return torch.randn(1 + (call * 7) % 13, 24, generator=generator)


@pytest.mark.parametrize("ranks", [2, 3])
def test_every_rank_gets_the_rank_order_sum_and_gather(tmp_path, ranks):
    path = tmp_path / "slots"
    ShmGroup(path, ranks, 0, create=True)  # the file; each rank process maps it
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                RANK_SCRIPT,
                str(path),
                str(ranks),
                str(r),
                str(tmp_path / f"{r}.pt"),
                str(CALLS),
            ]
        )
        for r in range(ranks)
    ]
    assert all(proc.wait(timeout=120) == 0 for proc in procs)
    got = {}
    for r in range(ranks):
        results = torch.load(tmp_path / f"{r}.pt")
        got[r] = (
            [t for i, t in enumerate(results) if i % 3 != 2],
            [t for i, t in enumerate(results) if i % 3 == 2],
        )
    expected_sums, expected_gathers = [], []
    for call in range(CALLS):
        parts = [_inputs(r, call) for r in range(ranks)]
        if call % 3 == 2:
            expected_gathers.append(torch.cat(parts, dim=-1))
        else:
            total = parts[0] + parts[1]
            for part in parts[2:]:
                total = total + part
            expected_sums.append(total)
    for rank in range(ranks):
        sums, gathers = got[rank]
        assert all(torch.equal(a, b) for a, b in zip(sums, expected_sums, strict=True)), rank
        assert all(torch.equal(a, b) for a, b in zip(gathers, expected_gathers, strict=True)), rank


def test_tensors_larger_than_a_slot_are_left_to_gloo(tmp_path):
    group = ShmGroup(tmp_path / "slots", 2, 0, create=True)
    assert group.fits(torch.empty(SLOT_BYTES // 4, dtype=torch.float32))
    assert not group.fits(torch.empty(SLOT_BYTES // 4 + 1, dtype=torch.float32))
