"""Downloads: the Llama-2-tokenized TinyStories shard the original trainer uses, llama2.c's tokenizer and the
tinyllamas "stories" checkpoints.

Every download goes to ``NAME.part`` first and resumes from where it stopped (HTTP Range) if interrupted; it
is checked against its known size (and sha256 where one is known) before being renamed into place, so a
file with its final name is always complete. The TinyStories shard comes inside a ~1 GB tarball, as in the
original's ``download_data.sh``: only the ``data00.bin`` member is extracted (streamed, never unpacked whole)
and the tarball is deleted afterwards.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import AnetrainError
from ..fsutil import file_sha256, fsync_dir

HF = "https://huggingface.co"


@dataclass(frozen=True)
class Asset:
    name: str  # file name on disk
    url: str
    size: int | None = None  # bytes, when known
    sha256: str | None = None


TINYSTORIES_TARBALL = Asset(
    "TinyStories_tok32000.tar.gz",
    f"{HF}/datasets/enio/TinyStories/resolve/main/tok32000/TinyStories_tok32000.tar.gz?download=true",
)
# The shard the original trainer trains on (llama2.c's validation shard): 20,658,981 uint16 tokens.
TINYSTORIES_SHARD = Asset("tinystories_data00.bin", "data00.bin", size=41_317_962)

ASSETS: dict[str, Asset] = {
    "tokenizer": Asset(
        "tokenizer.bin",
        "https://raw.githubusercontent.com/karpathy/llama2.c/master/tokenizer.bin",
        size=433_869,
        sha256="50a52ef822ee9e83de5ce9d0be0a025a773d019437f58b5ff9dcafb063ece361",
    ),
    "stories260K": Asset(
        "stories260K.bin",
        f"{HF}/karpathy/tinyllamas/resolve/main/stories260K/stories260K.bin",
        size=1_056_540,
        sha256="b0a507e7ad0f626624f17112325e66691f9076d622e1d3274d103d00299f2696",
    ),
    "tok512": Asset(
        "tok512.bin",
        f"{HF}/karpathy/tinyllamas/resolve/main/stories260K/tok512.bin",
        size=6_227,
        sha256="037cb335abb25d1fa9e8ecae30ed2a3a8ace9302862ebcdc05d51a6bbb10c312",
    ),
    "stories15M": Asset(
        "stories15M.bin", f"{HF}/karpathy/tinyllamas/resolve/main/stories15M.bin", size=60_816_028
    ),
    "stories42M": Asset(
        "stories42M.bin", f"{HF}/karpathy/tinyllamas/resolve/main/stories42M.bin", size=167_020_572
    ),
    "stories110M": Asset(
        "stories110M.bin", f"{HF}/karpathy/tinyllamas/resolve/main/stories110M.bin", size=438_381_596
    ),
}

Progress = Callable[[int, int | None], None]


def _check(path: Path, asset: Asset) -> None:
    size = path.stat().st_size
    if asset.size is not None and size != asset.size:
        raise AnetrainError(
            f"{path}: downloaded {size} bytes, expected {asset.size}; delete it and try again"
        )
    if asset.sha256 is not None and file_sha256(path) != asset.sha256:
        raise AnetrainError(f"{path}: sha256 does not match the published file; delete it and try again")


def fetch(asset: Asset, out_dir: Path, *, progress: Progress | None = None, timeout: float = 30.0) -> Path:
    """Download ``asset`` into ``out_dir`` (resuming a ``.part`` file), verify it, return its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    dest = out_dir / asset.name
    if dest.exists():
        _check(dest, asset)
        return dest
    part = out_dir / (asset.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(asset.url, headers={"User-Agent": "anetrain"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            if have and resp.status != 206:  # the server ignored the range: start over
                have = 0
            length = resp.headers.get("Content-Length")
            total = have + int(length) if length is not None else asset.size
            with open(part, "ab" if have else "wb") as f:
                done = have
                while block := resp.read(1 << 20):
                    f.write(block)
                    done += len(block)
                    if progress:
                        progress(done, total)
                f.flush()
                os.fsync(f.fileno())
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the range starts at the end: the .part file is already complete
            pass
        else:
            raise AnetrainError(f"{asset.url}: download failed (HTTP {e.code} {e.reason})") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise AnetrainError(
            f"{asset.url}: cannot download ({reason}); are you offline? {part.name} keeps what was fetched "
            "and the next attempt resumes from it"
        ) from None
    _check(part, asset)
    os.replace(part, dest)
    fsync_dir(out_dir)
    return dest


def mirrored(asset: Asset, mirror: str | None) -> Asset:
    """The asset fetched from ``mirror`` (scheme and host replaced, path kept), e.g. a local test server."""
    if not mirror:
        return asset
    parts = urllib.parse.urlsplit(asset.url)
    base = urllib.parse.urlsplit(mirror)
    return Asset(
        asset.name,
        urllib.parse.urlunsplit((base.scheme, base.netloc, parts.path, parts.query, "")),
        asset.size,
        asset.sha256,
    )


def fetch_tinystories(
    out_dir: Path,
    *,
    tarball: Asset = TINYSTORIES_TARBALL,
    keep_tarball: bool = False,
    progress: Progress | None = None,
) -> Path:
    """The Llama-2-tokenized TinyStories shard ``tinystories_data00.bin``, as the original downloads it."""
    dest = out_dir / TINYSTORIES_SHARD.name
    if dest.exists():
        _check(dest, TINYSTORIES_SHARD)
        return dest
    tar_path = fetch(tarball, out_dir, progress=progress)
    part = out_dir / (TINYSTORIES_SHARD.name + ".part")
    try:
        with tarfile.open(tar_path, "r:gz") as tar:
            member = next((m for m in tar if m.isfile() and m.name.endswith(TINYSTORIES_SHARD.url)), None)
            if member is None:
                raise AnetrainError(f"{tar_path}: no member named *{TINYSTORIES_SHARD.url} in the archive")
            src = tar.extractfile(member)
            assert src is not None
            with src, open(part, "wb") as f:
                shutil.copyfileobj(src, f, 1 << 20)
                f.flush()
                os.fsync(f.fileno())
    except (tarfile.TarError, EOFError, OSError) as e:
        raise AnetrainError(f"{tar_path}: not a readable .tar.gz ({e}); delete it and try again") from None
    _check(part, TINYSTORIES_SHARD)
    os.replace(part, dest)
    fsync_dir(out_dir)
    if not keep_tarball:
        tar_path.unlink()
    return dest
