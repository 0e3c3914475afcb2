"""Ahead-of-time partitions (engines.parallel.partition, ``lmi partition``): what the manifest records,
that each rank's file loads the exact parameters runtime sharding gives, and the refusals.

Tiny seeded random checkpoints in fp32: Llama (4 heads, 2 KV heads: split) and Qwen2 (q/k/v biases,
tied embeddings, 1 KV head: replicated, 3 layers over 2 stages).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from support import tiny_model_script, tiny_qwen2

from engines.base import EngineLoadError
from engines.llama.weights import load_llama
from engines.parallel.layout import ParallelLayout
from engines.parallel.partition import MANIFEST, Manifest, rank_file_name, source_hash, write_partition
from serving.cli import main

DEGREES = [(2, 1), (2, 2)]


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return tiny_model_script().make_tiny_model("llama", tmp_path_factory.mktemp("llama"), seed=0)


@pytest.fixture(scope="module")
def sources(llama, tmp_path_factory) -> dict[str, Path]:
    return {"llama": llama, "qwen2": tiny_qwen2(tmp_path_factory.mktemp("qwen2"), vocab_size=301)}


@pytest.fixture(scope="module")
def partitions(sources, tmp_path_factory) -> dict[tuple, Path]:
    """(model, tp, pp, dtype) -> partition folder."""
    out = {}
    for model, source in sources.items():
        for tp, pp in DEGREES:
            for dtype in ("fp32", "bf16"):
                folder = tmp_path_factory.mktemp(f"{model}-tp{tp}-pp{pp}-{dtype}")
                write_partition(source, folder, tp, pp, dtype)
                out[model, tp, pp, dtype] = folder
    return out


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(["partition", *argv])
    captured = capsys.readouterr()
    return info.value.code, captured.out, captured.err


@pytest.mark.parametrize(("tp", "pp"), DEGREES)
def test_manifest_records_degrees_dtype_and_each_files_size_and_hash(sources, partitions, tp, pp):
    folder = partitions["llama", tp, pp, "fp32"]
    manifest = Manifest.read(folder)
    assert (manifest.tensor_parallel_degree, manifest.pipeline_parallel_degree) == (tp, pp)
    assert manifest.dtype == "float32"
    assert manifest.source == str(sources["llama"])
    assert manifest.source_sha256 == source_hash(sources["llama"])
    world = tp * pp
    assert [(f.rank, f.file) for f in manifest.files] == [(r, rank_file_name(r, world)) for r in range(world)]
    for entry in manifest.files:
        data = (folder / entry.file).read_bytes()
        assert entry.bytes == len(data)
        assert entry.sha256 == hashlib.sha256(data).hexdigest()
    assert sorted(p.name for p in folder.glob("*.safetensors")) == [f.file for f in manifest.files]
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (folder / name).read_bytes() == (sources["llama"] / name).read_bytes()
    assert Manifest.read(partitions["llama", tp, pp, "bf16"]).dtype == "bfloat16"


@pytest.mark.parametrize("model", ["llama", "qwen2"])
@pytest.mark.parametrize(("tp", "pp"), DEGREES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_rank_loads_bit_equal_to_runtime_sharding(sources, partitions, model, tp, pp, dtype):
    folder = partitions[model, tp, pp, "fp32" if dtype == torch.float32 else "bf16"]
    for rank in range(tp * pp):
        layout = ParallelLayout(tp, pp, rank)
        runtime, _ = load_llama(str(sources[model]), dtype, max_model_len=64, pack=False, layout=layout)
        stored, _ = load_llama(str(folder), dtype, max_model_len=64, pack=False, layout=layout)
        expected, got = dict(runtime.named_parameters()), dict(stored.named_parameters())
        assert list(got) == list(expected)
        for name, param in expected.items():
            assert got[name].dtype == param.dtype, name
            assert torch.equal(got[name], param), f"rank {rank}: {name}"


def _served_state(model) -> dict[str, torch.Tensor]:
    """Every parameter, and each projection's weight as served: its oneDNN-packed copy where packed."""
    from engines.llama.linear import Linear

    state = {name: param.detach() for name, param in model.named_parameters()}
    for name, module in model.named_modules():
        if isinstance(module, Linear) and module.packed is not None:
            state[f"{name}.weight"] = module.packed.to_dense()
    return state


def _maps(path: Path) -> bool:
    return str(path) in Path("/proc/self/maps").read_text()


def _dense_runs(dtype: torch.dtype) -> bool:
    """Whether this CPU runs the dense kernel; on one that does, a failed build fails here."""
    from engines.device import cpu_bf16_flags
    from engines.llama.linear import dense_kernel

    if "avx512_bf16" not in cpu_bf16_flags():
        return False
    assert dense_kernel(dtype) is not None, "the dense kernel did not build"
    return True


@pytest.mark.parametrize("model", ["llama", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dense", [True, False], ids=["dense-kernel", "onednn"])
def test_each_rank_serves_what_runtime_sharding_serves(sources, partitions, model, dtype, dense, monkeypatch):
    """The dense kernel serves the projections from the file's pages (mapped, resident); oneDNN's packed
    copies leave nothing mapped."""
    if not dense:
        monkeypatch.setenv("LMI_DENSE_KERNEL", "0")
    elif not _dense_runs(dtype):
        pytest.skip("the dense kernel needs AVX-512 BF16")
    folder = partitions[model, 2, 1, "bf16" if dtype == torch.bfloat16 else "fp32"]
    for rank in range(2):
        layout = ParallelLayout(2, 1, rank)
        runtime, _ = load_llama(str(sources[model]), dtype, max_model_len=64, layout=layout)
        stored, _ = load_llama(str(folder), dtype, max_model_len=64, layout=layout)
        expected, got = _served_state(runtime), _served_state(stored)
        assert list(got) == list(expected)
        for name, tensor in expected.items():
            assert torch.equal(got[name], tensor), f"rank {rank}: {name}"
        if Path("/proc/self/maps").is_file():
            assert _maps(folder / rank_file_name(rank, 2)) is dense


def _mapped_rss(address: int) -> int:
    """Bytes of the mapping holding ``address`` that this process has mapped in (smaps' Rss)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            low, high = (int(part, 16) for part in head.split("-"))
            inside = low <= address < high
        elif inside and head == "Rss:":
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(not Path("/proc/self/smaps").is_file(), reason="needs /proc/self/smaps")
def test_served_weights_are_mapped_in_before_the_load_returns(tmp_path, monkeypatch):
    """The projections served from the file are faulted in by the load (madvise), not by the first
    request; without that step (populate replaced) only the pages the load copied from are mapped."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from engines.parallel import partition as partition_module

    if not _dense_runs(torch.bfloat16):
        pytest.skip("the dense kernel needs AVX-512 BF16")
    config = LlamaConfig(
        vocab_size=512, hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path / "source")
    write_partition(tmp_path / "source", tmp_path / "tp2", 2, 1, "bf16")
    layout = ParallelLayout(2, 1, 0)

    def served_and_mapped() -> tuple[int, int]:
        model, _ = load_llama(str(tmp_path / "tp2"), torch.bfloat16, max_model_len=64, layout=layout)
        projections = [(layer.qkv, layer.o_proj, layer.gate_up, layer.down) for layer in model.layers]
        linears = [linear for group in projections for linear in group]
        assert all(linear.dense is not None for linear in linears)
        served = sum(linear.weight.numel() * linear.weight.element_size() for linear in linears)
        return served, _mapped_rss(linears[0].weight.data_ptr())

    served, mapped = served_and_mapped()
    assert served > 1 << 20
    assert mapped >= served
    monkeypatch.setattr(partition_module, "populate", lambda *args: None)
    served, mapped = served_and_mapped()
    assert mapped < served / 2


def test_weights_packing_declines_are_copied_off_the_file(sources, partitions, monkeypatch):
    from engines.llama.linear import Linear

    monkeypatch.setattr(Linear, "pack", lambda self, keep_weight=False: False)
    folder, layout = partitions["llama", 2, 1, "fp32"], ParallelLayout(2, 1, 1)
    stored, _ = load_llama(str(folder), max_model_len=64, layout=layout)
    runtime, _ = load_llama(str(sources["llama"]), max_model_len=64, layout=layout)
    if Path("/proc/self/maps").is_file():
        assert not _maps(folder / rank_file_name(1, 2))
    for name, param in runtime.named_parameters():
        assert torch.equal(dict(stored.named_parameters())[name], param), name


@pytest.mark.parametrize("how", ["renamed over", "deleted", "rewritten in place"])
def test_a_served_rank_survives_its_file_being_replaced(partitions, tmp_path, how, monkeypatch):
    """A served rank's weights stay as loaded when its file is replaced by a rename or deleted; in
    place (same inode) only where nothing serves from the file's pages (the dense kernel does)."""
    if how == "rewritten in place":
        monkeypatch.setenv("LMI_DENSE_KERNEL", "0")
    folder = shutil.copytree(partitions["llama", 2, 1, "bf16"], tmp_path / "copy")
    layout = ParallelLayout(2, 1, 0)
    model, _ = load_llama(str(folder), torch.bfloat16, max_model_len=64, layout=layout)
    before = {name: tensor.clone() for name, tensor in _served_state(model).items()}
    rank_file = folder / rank_file_name(0, 2)
    size = rank_file.stat().st_size
    if how == "rewritten in place":
        with rank_file.open("r+b") as handle:  # truncated and rewritten, the same inode
            handle.truncate(0)
            handle.write(b"\xff" * size)
    elif how == "renamed over":
        (folder / "new").write_bytes(b"\xff" * size)
        (folder / "new").rename(rank_file)
    else:
        rank_file.unlink()
    after = _served_state(model)
    assert all(torch.equal(after[name], tensor) for name, tensor in before.items())


def test_rank_files_are_plain_safetensors_in_load_order(partitions):
    from safetensors import safe_open

    from engines.parallel.partition import load_order

    folder = partitions["qwen2", 2, 2, "fp32"]  # tied embeddings, biases, two stages
    for rank in range(4):
        model, _ = load_llama(str(folder), max_model_len=64, pack=False, layout=ParallelLayout(2, 2, rank))
        path = folder / rank_file_name(rank, 4)
        with safe_open(str(path), framework="pt") as handle:  # safetensors' own reader takes it
            stored = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
        params = dict(model.named_parameters())
        assert stored.keys() == params.keys()
        assert all(torch.equal(stored[name], param) for name, param in params.items())
        data = path.read_bytes()
        header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
        by_offset = sorted(header, key=lambda name: header[name]["data_offsets"][0])
        assert by_offset == load_order(model)
        projections = [
            name.endswith(("qkv.weight", "o_proj.weight", "up.weight", "down.weight")) for name in by_offset
        ]
        assert projections == sorted(projections)  # the copied tensors, then the packed ones


def test_partitioning_again_replaces_rank_files_rather_than_rewriting_them(llama, tmp_path):
    write_partition(llama, tmp_path / "out", 2, 1, "fp32")
    inodes = {p.name: p.stat().st_ino for p in (tmp_path / "out").glob("rank-*")}
    write_partition(llama, tmp_path / "out", 2, 1, "fp32")
    assert {p.name: p.stat().st_ino for p in (tmp_path / "out").glob("rank-*")}.keys() == inodes.keys()
    assert all(p.stat().st_ino != inodes[p.name] for p in (tmp_path / "out").glob("rank-*"))
    assert not list((tmp_path / "out").glob("*.partial"))


@pytest.mark.parametrize(("tp", "pp"), [(1, 1), (4, 1), (2, 2)])
def test_other_degrees_are_refused_naming_both(partitions, tp, pp):
    folder = partitions["llama", 2, 1, "fp32"]
    with pytest.raises(EngineLoadError) as info:
        load_llama(str(folder), max_model_len=64, layout=ParallelLayout(tp, pp, 0))
    message = str(info.value)
    assert "is partitioned for tensor_parallel_degree=2, pipeline_parallel_degree=1" in message
    assert f"runs tensor_parallel_degree={tp}, pipeline_parallel_degree={pp}" in message
    assert f"--tensor-parallel-degree {tp} --pipeline-parallel-degree {pp}" in message


def test_a_truncated_or_missing_rank_file_is_refused(partitions, tmp_path):
    folder = shutil.copytree(partitions["llama", 2, 1, "fp32"], tmp_path / "copy")
    name = rank_file_name(1, 2)
    size = (folder / name).stat().st_size
    with (folder / name).open("r+b") as handle:
        handle.truncate(size - 100)
    layout = ParallelLayout(2, 1, 1)
    with pytest.raises(EngineLoadError, match=f"{size - 100} bytes, the manifest says {size} bytes"):
        load_llama(str(folder), max_model_len=64, layout=layout)
    load_llama(str(folder), max_model_len=64, layout=layout.for_rank(0))  # rank 0 reads only its file
    (folder / name).unlink()
    with pytest.raises(EngineLoadError, match="is missing, the manifest says"):
        load_llama(str(folder), max_model_len=64, layout=layout)


def test_a_broken_manifest_is_refused(partitions, tmp_path):
    folder = shutil.copytree(partitions["llama", 2, 1, "fp32"], tmp_path / "copy")
    (folder / MANIFEST).write_text("{not json")
    with pytest.raises(EngineLoadError, match="is not a valid partition manifest"):
        load_llama(str(folder), max_model_len=64, layout=ParallelLayout(2, 1, 0))


def test_cli_writes_a_partition_and_prints_the_manifest(llama, tmp_path, capsys):
    output = tmp_path / "tp2pp2"
    code, out, _ = _cli(
        capsys, "--model-dir", str(llama), "--tensor-parallel-degree", "2", "--pipeline-parallel-degree",
        "2", "--dtype", "fp32", "--output", str(output),
    )  # fmt: skip
    assert code == 0
    manifest = Manifest.read(output)
    assert (manifest.tensor_parallel_degree, manifest.pipeline_parallel_degree) == (2, 2)
    assert "tensor_parallel_degree=2, pipeline_parallel_degree=2 (float32)" in out
    for entry in manifest.files:
        assert f"{entry.file}  {entry.bytes:>15,}  {entry.sha256[:16]}" in out
    total = sum(entry.bytes for entry in manifest.files)
    assert f"4 files, {total:,} bytes" in out
    serve = "OPTION_TENSOR_PARALLEL_DEGREE=2 OPTION_PIPELINE_PARALLEL_DEGREE=2 lmi serve --model-dir"
    assert f"{serve} {output}" in out


def test_cli_refuses_a_non_empty_output_unless_forced(llama, tmp_path, capsys):
    output = tmp_path / "out"
    args = ["--model-dir", str(llama), "--dtype", "fp32", "--output", str(output)]
    assert _cli(capsys, *args, "--tensor-parallel-degree", "2", "--pipeline-parallel-degree", "2")[0] == 0
    code, _, err = _cli(capsys, *args, "--tensor-parallel-degree", "2")
    assert code == 2
    assert f"--output {output} exists and is not empty" in err
    assert Manifest.read(output).pipeline_parallel_degree == 2  # untouched
    assert _cli(capsys, *args, "--tensor-parallel-degree", "2", "--force")[0] == 0
    assert Manifest.read(output).pipeline_parallel_degree == 1
    assert sorted(p.name for p in output.glob("rank-*")) == [rank_file_name(r, 2) for r in range(2)]


@pytest.mark.parametrize(
    ("tp", "pp", "message"),
    [
        (3, 1, "The parallel degrees do not fit this model: num_key_value_heads=2"),
        (2, 3, "num_hidden_layers=2 is fewer than pipeline_parallel_degree=3"),
    ],
)
def test_cli_refuses_degrees_that_do_not_fit(llama, tmp_path, capsys, tp, pp, message):
    argv = ["--model-dir", str(llama), "--tensor-parallel-degree", str(tp)]
    code, _, err = _cli(capsys, *argv, "--pipeline-parallel-degree", str(pp), "--output", str(tmp_path / "o"))
    assert code == 2
    assert message in err
    assert not (tmp_path / "o").exists()


def test_cli_refuses_an_unsupported_architecture(tmp_path, capsys):
    gpt2 = tiny_model_script().make_tiny_model("gpt2", tmp_path / "gpt2", seed=0)
    argv = ["--model-dir", str(gpt2), "--tensor-parallel-degree", "2", "--output", str(tmp_path / "o")]
    code, _, err = _cli(capsys, *argv)
    assert code == 2
    assert "Architecture 'GPT2LMHeadModel' (model_type 'gpt2') is not supported" in err
    assert not (tmp_path / "o").exists()


def test_cli_refuses_a_partition_a_missing_folder_and_its_own_source(llama, partitions, tmp_path, capsys):
    cases = {
        str(partitions["llama", 2, 1, "fp32"]): "is already a partition; partition the original checkpoint",
        str(tmp_path / "absent"): "is not a folder, an s3:// URL or a Hub id",
    }
    for source, message in cases.items():
        argv = ["--model-dir", source, "--tensor-parallel-degree", "2", "--output", str(tmp_path / "o")]
        code, _, err = _cli(capsys, *argv)
        assert (code, message in err) == (2, True), err
    argv = ["--model-dir", str(llama), "--tensor-parallel-degree", "2", "--output", str(llama), "--force"]
    code, _, err = _cli(capsys, *argv)
    assert code == 2
    assert "--output is the source folder" in err
    assert not (llama / MANIFEST).exists()


def test_cli_help_lists_partition(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "partition" in capsys.readouterr().out


def test_auto_keeps_the_checkpoints_dtype(llama, tmp_path):
    assert write_partition(llama, tmp_path / "auto", 2).dtype == "float32"  # the tiny checkpoint is fp32


def test_a_bf16_partition_is_not_served_as_fp32(partitions):
    from engines.base import EngineLoadError

    layout = ParallelLayout(2, 1, 0)
    with pytest.raises(EngineLoadError, match="stores bfloat16 weights; option.dtype=float32"):
        load_llama(str(partitions["llama", 2, 1, "bf16"]), torch.float32, max_model_len=64, layout=layout)
    model, _ = load_llama(
        str(partitions["llama", 2, 1, "fp32"]), torch.bfloat16, max_model_len=64, layout=layout
    )
    assert model.dtype == torch.bfloat16  # fp32 weights convert down exactly as the original's would


def test_save_mp_checkpoint_path_partitions_again_for_another_model(sources, partitions, tmp_path):
    import shutil

    from engines.base import EngineConfig
    from engines.rolling.factory import save_partition

    target = tmp_path / "saved"
    shutil.copytree(partitions["qwen2", 2, 1, "fp32"], target)  # someone else's partition
    config = EngineConfig(
        model_path=str(sources["llama"]), dtype="fp32", tensor_parallel_degree=2,
        save_mp_checkpoint_path=str(target),
    )  # fmt: skip
    served = save_partition(config)
    assert served.model_path == str(target)
    assert Manifest.read(target).source == str(sources["llama"])
    written = {f.name: f.stat().st_mtime_ns for f in target.glob("rank-*")}
    reused = save_partition(config)
    assert reused.model_path == str(target)
    assert {f.name: f.stat().st_mtime_ns for f in target.glob("rank-*")} == written  # kept, not rewritten


def test_populate_touches_each_page_of_the_span_where_madvise_is_missing():
    """Kernels before 5.14 refuse MADV_POPULATE_READ: one byte of every page from the span's page on."""
    import mmap

    from engines.parallel.rank_file import populate

    class OldKernelMapping:
        def __init__(self) -> None:
            self.read: list[int] = []

        def madvise(self, *args: int) -> None:
            raise OSError(22, "Invalid argument")

        def __getitem__(self, offset: int) -> int:
            self.read.append(offset)
            return 0

    page = mmap.PAGESIZE
    mapping = OldKernelMapping()
    populate(mapping, page + 100, 4 * page + 1)
    assert mapping.read == [page, 2 * page, 3 * page, 4 * page]
