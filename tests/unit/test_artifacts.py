"""serving.artifacts without S3: file selection, the cache's atomicity and validation, archive safety,
verification of downloaded files, Hub offline mode, and `lmi pull` for an archive."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from support import ROOT

from serving.artifacts import ArtifactError, FetchOptions, fetch
from serving.artifacts.archive import extract_archive
from serving.artifacts.cache import FileRecord, Manifest, materialize, problem
from serving.artifacts.errors import UnsafeArchive
from serving.artifacts.fetch import source_kind
from serving.artifacts.selection import parse_patterns, select_files
from serving.artifacts.verify import check_safetensors, verify_files


def _safetensors(path: Path, payload: bytes = b"\0" * 16) -> Path:
    header = json.dumps(
        {"w": {"dtype": "F32", "shape": [len(payload) // 4], "data_offsets": [0, len(payload)]}}
    )
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode() + payload)
    return path


# ---- selection -----------------------------------------------------------------------------


def test_selection_skips_pickle_copies_only_when_safetensors_exist():
    repo = [
        "config.json",
        "model.safetensors",
        "pytorch_model.bin",
        "tokenizer.json",
        "tf_model.h5",
        "README.md",
    ]
    assert select_files(repo) == ["README.md", "config.json", "model.safetensors", "tokenizer.json"]
    pickle_only = ["config.json", "pytorch_model.bin", "tokenizer.json"]
    assert select_files(pickle_only) == pickle_only  # the loader decides (allow_unsafe_weights)


def test_allow_and_ignore_patterns_override_the_default():
    repo = ["config.json", "model.safetensors", "pytorch_model.bin", "sub/extra.txt"]
    assert select_files(repo, allow=("*.json", "*.bin")) == ["config.json", "pytorch_model.bin"]
    assert select_files(repo, ignore=("*.txt",)) == ["config.json", "model.safetensors"]
    assert select_files(repo, allow=("sub/*",)) == ["sub/extra.txt"]


def test_patterns_parse_from_csv_or_json_and_bad_values_name_the_key():
    assert parse_patterns("*.json, *.safetensors") == ("*.json", "*.safetensors")
    assert parse_patterns('["*.json"]') == ("*.json",)
    assert parse_patterns("") is None
    with pytest.raises(ValueError, match="not a JSON list"):
        parse_patterns("[*.json")
    with pytest.raises(ValueError, match="Invalid value 'soon' for option.download_timeout"):
        FetchOptions.from_properties({"download_timeout": "soon"})
    assert FetchOptions.from_properties({"model_loading_timeout": "100"}).timeout_s == pytest.approx(90)


def test_source_kinds(tmp_path):
    archive = tmp_path / "model.tar.gz"
    archive.write_bytes(b"")
    assert source_kind("s3://bucket/prefix/") == "s3"
    assert source_kind(str(archive)) == "archive"
    assert source_kind(str(tmp_path)) is None  # a folder is used in place
    assert source_kind("HuggingFaceTB/SmolLM2-135M") == "hub"
    assert fetch(str(tmp_path)) == tmp_path
    with pytest.raises(ArtifactError, match="is not a folder, an archive"):
        fetch(str(tmp_path / "missing" / "dir"))


# ---- cache ---------------------------------------------------------------------------------


def _soon() -> float:
    return time.monotonic() + 5


def test_failed_produce_leaves_nothing_and_a_trusted_folder_is_reused(tmp_path):
    target = tmp_path / "cache" / "abc"

    def broken(staging: Path) -> Manifest:
        (staging / "half.bin").write_bytes(b"x" * 10)
        raise ArtifactError("network went away")

    with pytest.raises(ArtifactError, match="network went away"):
        materialize(target, "s3://b/p/", broken, _soon())
    assert not target.exists()
    assert list(target.parent.glob(".abc.staging-*")) == []

    calls = []

    def good(staging: Path) -> Manifest:
        calls.append(1)
        (staging / "a.txt").write_bytes(b"hello")
        return Manifest("s3://b/p/", files={"a.txt": FileRecord(5)})

    assert materialize(target, "s3://b/p/", good, _soon()) == target
    assert materialize(target, "s3://b/p/", good, _soon()) == target
    assert calls == [1]
    assert problem(target, "s3://b/p/") is None
    assert "holds s3://b/p/, not s3://other/" in problem(target, "s3://other/")


def test_truncated_or_unlisted_cache_is_not_trusted_and_is_refetched(tmp_path):
    target = tmp_path / "folder"

    def produce(staging: Path) -> Manifest:
        (staging / "w.bin").write_bytes(b"0123456789")
        return Manifest("src", files={"w.bin": FileRecord(10)})

    materialize(target, "src", produce, _soon())
    (target / "w.bin").write_bytes(b"01234")  # the disk lost the tail
    assert problem(target, "src") == f"w.bin in {target} is 5 bytes, expected 10"
    materialize(target, "src", produce, _soon())
    assert (target / "w.bin").read_bytes() == b"0123456789"
    (target / ".lmi-manifest.json").unlink()  # e.g. a folder copied in by hand, half done
    assert "has no readable .lmi-manifest.json" in problem(target, "src")


def test_a_user_folder_is_never_wiped_and_finished_folders_are_readable(tmp_path):
    dest = tmp_path / "opt-ml-model"
    dest.mkdir()
    (dest / "serving.properties").write_text("option.rolling_batch=disable\n")

    def produce(staging: Path) -> Manifest:
        (staging / "w.bin").write_bytes(b"0123456789")
        return Manifest("src", files={"w.bin": FileRecord(10)})

    with pytest.raises(ArtifactError, match="already holds files that are not a download of src"):
        materialize(dest, "src", produce, _soon(), owned=False)
    assert sorted(p.name for p in dest.iterdir()) == ["serving.properties"]
    fresh = tmp_path / "fresh"
    materialize(fresh, "src", produce, _soon(), owned=False)
    assert fresh.stat().st_mode & 0o077 != 0  # not mkdtemp's 0700: other users can read the weights
    (fresh / "notes.txt").write_text("mine")
    (fresh / "w.bin").write_bytes(b"short")  # a damaged earlier download of the same source
    materialize(fresh, "src", produce, _soon(), owned=False)
    assert (fresh / "w.bin").read_bytes() == b"0123456789"
    assert (fresh / "notes.txt").read_text() == "mine"  # files the manifest does not list stay
    with pytest.raises(ArtifactError, match="holds a download of src, not other"):
        materialize(fresh, "other", produce, _soon(), owned=False)


def test_a_new_download_merges_into_a_users_folder_with_nested_files(tmp_path):
    """Replacing an earlier download of the same source in a user's folder: nested folders merge,
    the user's own files stay, and the manifest that makes it trusted comes last."""
    dest = tmp_path / "dest"

    def version(text: str):
        def produce(staging: Path) -> Manifest:
            (staging / "a" / "b").mkdir(parents=True)
            (staging / "a" / "b" / "w.bin").write_text(text)
            (staging / "config.json").write_text("{}")
            return Manifest("src", files={"a/b/w.bin": FileRecord(len(text)), "config.json": FileRecord(2)})

        return produce

    materialize(dest, "src", version("one"), _soon(), owned=False)
    (dest / "a" / "b" / "mine.txt").write_text("user file")
    (dest / "a" / "b" / "w.bin").write_text("x")  # damaged: the next pull replaces it
    materialize(dest, "src", version("three"), _soon(), owned=False)
    assert (dest / "a" / "b" / "w.bin").read_text() == "three"
    assert (dest / "a" / "b" / "mine.txt").read_text() == "user file"
    assert problem(dest, "src") is None


def test_fetch_options_must_be_positive():
    with pytest.raises(ValueError, match="must be positive"):
        FetchOptions(retries=0)


def test_fetch_options_come_from_the_typed_settings_of_the_config(tmp_path):
    """The worker builds its download options from the values load_config parsed, not from strings."""
    from serving.config import load_config

    environ = {"OPTION_MODEL_LOADING_TIMEOUT": "100", "OPTION_ALLOW_PATTERNS": "*.json, *.safetensors"}
    options = FetchOptions.from_settings(load_config(str(tmp_path), environ).settings)
    assert options.timeout_s == pytest.approx(90)  # 0.9 x model_loading_timeout by default
    assert options.allow_patterns == ("*.json", "*.safetensors")
    environ["OPTION_DOWNLOAD_TIMEOUT"] = "30"
    assert FetchOptions.from_settings(load_config(str(tmp_path), environ).settings).timeout_s == 30


def test_only_connection_failures_fall_back_to_the_hub_cache():
    from huggingface_hub.errors import OfflineModeIsEnabled

    from serving.artifacts.hub import _unreachable

    assert _unreachable(OfflineModeIsEnabled("offline"))
    assert _unreachable(ConnectionError("refused"))
    assert not _unreachable(ValueError("bad token"))


def test_stale_staging_of_a_killed_download_is_removed(tmp_path):
    target = tmp_path / "t"
    stale = tmp_path / ".t.staging-dead"
    stale.mkdir()
    (stale / "partial").write_bytes(b"x")
    materialize(target, "src", lambda s: Manifest("src"), _soon())
    assert not stale.exists()


# ---- archives ------------------------------------------------------------------------------


def _tar(path: Path, members: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return path


@pytest.mark.parametrize(
    ("members", "links"),
    [
        ({"../escape.txt": b"x"}, None),
        ({"/etc/owned.txt": b"x"}, None),
        ({"config.json": b"{}"}, {"evil": "/etc/passwd"}),
        ({"config.json": b"{}"}, {"up": "../../outside"}),
    ],
    ids=["dotdot", "absolute", "absolute-link", "relative-link-outside"],
)
def test_unsafe_archive_entries_are_rejected(tmp_path, members, links):
    archive = _tar(tmp_path / "model.tar.gz", members, links)
    options = FetchOptions(download_dir=str(tmp_path / "cache"))
    with pytest.raises(UnsafeArchive, match="unsafe entry"):
        fetch(str(archive), options)
    assert not (tmp_path / "escape.txt").exists()
    assert not Path("/etc/owned.txt").exists()
    cache = tmp_path / "cache"
    assert not cache.exists() or all(p.name.endswith(".lock") for p in cache.iterdir())


def test_archive_is_extracted_once_into_the_cache(tmp_path):
    weights = _safetensors(tmp_path / "m.safetensors")
    archive = _tar(
        tmp_path / "model.tar.gz", {"model/config.json": b"{}", "model/m.safetensors": weights.read_bytes()}
    )
    options = FetchOptions(download_dir=str(tmp_path / "cache"))
    folder = fetch(str(archive), options)
    assert folder.name == "model"  # the single top-level folder of the archive
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "m.safetensors"]
    mtime = (folder / "config.json").stat().st_mtime_ns
    assert fetch(str(archive), options) == folder
    assert (folder / "config.json").stat().st_mtime_ns == mtime  # reused, not extracted again


def test_extract_archive_reports_a_damaged_file(tmp_path):
    bad = tmp_path / "broken.tar.gz"
    bad.write_bytes(b"\x1f\x8b\x08not really gzip")
    (tmp_path / "out").mkdir()
    with pytest.raises(ArtifactError, match="is not a readable tar archive"):
        extract_archive(bad, tmp_path / "out")


# ---- verification --------------------------------------------------------------------------


def _problems(folder, expected, etag_is_md5=lambda name: True):
    return [str(p) for p in verify_files(folder, expected, "s3://b/p/", etag_is_md5)]


def test_verify_names_every_short_corrupt_and_malformed_file(tmp_path):
    good = _safetensors(tmp_path / "model.safetensors")
    size = good.stat().st_size
    import hashlib

    md5 = hashlib.md5(good.read_bytes()).hexdigest()  # noqa: S324 - S3 ETag semantics
    assert _problems(tmp_path, {"model.safetensors": FileRecord(size, md5)}) == []
    data = bytearray(good.read_bytes())
    data[-1] ^= 0xFF  # same size, one bit-flipped byte
    good.write_bytes(bytes(data))
    (tmp_path / "short.json").write_bytes(b"{}")
    problems = _problems(
        tmp_path,
        {
            "model.safetensors": FileRecord(size, md5),
            "short.json": FileRecord(3),
            "missing.bin": FileRecord(1),
        },
    )
    assert len(problems) == 3  # all of them, so one retry fetches every bad file
    assert "missing.bin from s3://b/p/ was not downloaded" in problems[0]
    assert "model.safetensors from s3://b/p/ is corrupt: its MD5" in problems[1]
    assert "short.json from s3://b/p/ is 2 bytes, but the listing says 3" in problems[2]
    # an SSE-KMS object's ETag is not its MD5: no false alarm when the store says so
    assert _problems(tmp_path, {"model.safetensors": FileRecord(size, md5)}, lambda name: False) == []
    good.write_bytes(bytes(data[:-4]))  # truncated: caught by the header check without an MD5
    assert (
        "not a valid safetensors file: its tensors end at byte"
        in _problems(tmp_path, {"model.safetensors": FileRecord(size - 4, "abc-2")})[0]
    )


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"\xff" * 7, "shorter than a safetensors header"),
        (struct.pack("<Q", 2) + b"[]", "not a valid safetensors header"),
        (struct.pack("<Q", 9) + b'{"w": {}}', "not a valid safetensors header"),
        (struct.pack("<Q", 1 << 40) + b"{}", "its header claims"),
    ],
)
def test_malformed_safetensors_headers_are_reasons_not_crashes(tmp_path, content, reason):
    (tmp_path / "x.safetensors").write_bytes(content)
    assert reason in check_safetensors(tmp_path / "x.safetensors")


def test_s3_keys_that_would_escape_the_folder_are_refused():
    from serving.artifacts.s3_client import S3Location, safe_name

    location = S3Location.parse("s3://b/models/m")
    assert location.prefix == "models/m/"
    assert safe_name("models/m/sub/config.json", location) == "sub/config.json"
    for key in ("models/m//etc/x", "models/m/../../x", "models/m/a/../../b"):
        with pytest.raises(ArtifactError, match="cannot be stored safely"):
            safe_name(key, location)


def test_only_pickle_weights_need_explicit_consent():
    from serving.artifacts.errors import NoWeights
    from serving.artifacts.selection import check_weights

    names = ["config.json", "pytorch_model.bin"]
    with pytest.raises(NoWeights, match="no \\*.safetensors weights, only pickle files"):
        check_weights(names, "s3://b/p/", FetchOptions())
    check_weights(names, "s3://b/p/", FetchOptions(allow_unsafe_weights=True))
    with pytest.raises(NoWeights, match="has config.json but no weights"):
        check_weights(["config.json", "tokenizer.json"], "s3://b/p/", FetchOptions())


# ---- Hub offline and lmi pull ----------------------------------------------------------------


def _populate_hf_cache(hf_home: Path, repo: str, files: dict[str, bytes]) -> Path:
    """The layout huggingface_hub writes: refs/main -> a commit, snapshots/<commit>/<files>."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = hf_home / "hub" / ("models--" + repo.replace("/", "--"))
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        (snapshot / name).write_bytes(data)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    return snapshot


def _run(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    full = {**os.environ, **env, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=120)


def test_hub_offline_uses_the_populated_cache_and_explains_a_miss(tmp_path):
    snapshot = _populate_hf_cache(tmp_path, "acme/tiny", {"config.json": b"{}", "model.safetensors": b"x"})
    env = {"HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "HTTPS_PROXY": "http://127.0.0.1:9"}
    code = "from serving.artifacts import fetch; print(fetch('acme/tiny'))"
    result = _run(code, env)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()) == snapshot
    missing = _run("from serving.artifacts import fetch; fetch('acme/absent')", env)
    assert missing.returncode != 0
    assert "acme/absent (revision main) is not in the local Hugging Face cache" in missing.stderr
    assert "HF_HUB_OFFLINE=1 forbids downloading it" in missing.stderr


def test_a_cached_hub_snapshot_with_only_pickle_weights_needs_consent(tmp_path):
    _populate_hf_cache(tmp_path, "acme/pickled", {"config.json": b"{}", "pytorch_model.bin": b"x"})
    env = {"HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    refused = _run("from serving.artifacts import fetch; fetch('acme/pickled')", env)
    assert refused.returncode != 0
    assert "has no *.safetensors weights, only pickle files" in refused.stderr
    consent = "FetchOptions(allow_unsafe_weights=True)"
    code = f"from serving.artifacts import FetchOptions, fetch; fetch('acme/pickled', {consent})"
    assert _run(code, env).returncode == 0


def test_lmi_pull_extracts_an_archive_into_dest_and_prints_it(tmp_path):
    archive = _tar(
        tmp_path / "model.tar.gz",
        {"config.json": b"{}", "m.safetensors": _safetensors(tmp_path / "w.st").read_bytes()},
    )
    dest = tmp_path / "baked"
    result = subprocess.run(
        [sys.executable, "-m", "serving", "pull", str(archive), "--dest", str(dest)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(dest)
    assert (dest / "m.safetensors").is_file()
    assert json.loads((dest / ".lmi-manifest.json").read_text())["files"]["config.json"]["size"] == 2
    failed = subprocess.run(
        [sys.executable, "-m", "serving", "pull", str(tmp_path / "nothing.tar.gz")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert failed.returncode == 1
    assert "nothing to pull" in failed.stderr
