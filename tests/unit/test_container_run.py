"""What `lmi container run` mounts and passes, without a container engine."""

from __future__ import annotations

import io
import tarfile

import pytest

from serving.container.engine import ContainerError
from serving.container.run import environment, model_folder


def _tarball(path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_a_folder_is_mounted_as_it_is(tmp_path):
    assert model_folder(str(tmp_path)) == tmp_path.resolve()


def test_a_model_tarball_is_unpacked_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    archive = tmp_path / "model.tar.gz"
    _tarball(archive, {"serving.properties": b"engine=Python\n", "sub/model.py": b"x = 1\n"})
    folder = model_folder(str(archive))
    assert (folder / "serving.properties").read_text() == "engine=Python\n"
    assert (folder / "sub" / "model.py").is_file()
    assert model_folder(str(archive)) == folder  # the second run reuses it


def test_an_unsafe_or_unreadable_model_dir_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    unsafe = tmp_path / "evil.tar.gz"
    _tarball(unsafe, {"../escape.txt": b"no"})
    with pytest.raises(ContainerError, match="unsafe entry"):
        model_folder(str(unsafe))
    assert not (tmp_path / "escape.txt").exists()
    plain = tmp_path / "notes.txt"
    plain.write_text("hello")
    with pytest.raises(ContainerError, match="neither a folder nor a .tar.gz"):
        model_folder(str(plain))


def test_environment_takes_the_callers_options_then_env_flags(monkeypatch):
    monkeypatch.setenv("OPTION_DTYPE", "fp32")
    monkeypatch.setenv("UNRELATED", "x")
    env = environment(["SERVING_LOG_LEVEL=debug", "OPTION_DTYPE=bf16"])
    assert env["OPTION_DTYPE"] == "bf16"  # --env wins
    assert env["SERVING_LOG_LEVEL"] == "debug"
    assert "UNRELATED" not in env
    with pytest.raises(ContainerError, match="expected KEY=VALUE"):
        environment(["NOVALUE"])
