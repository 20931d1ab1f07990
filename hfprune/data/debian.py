"""Files from Debian packages, fetched once with ``apt-get download`` (no root needed) and cached.

Some real corpora this project uses ship inside Debian packages. Their text is never part of
this repository: the package is downloaded on first use and only the needed file is kept in
a cache folder (``$HFPRUNE_CACHE``, default ``~/.cache/hfprune``).
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

from hfprune.atomic import write_atomically
from hfprune.errors import HfpruneError


def cache_dir() -> Path:
    return Path(os.environ.get("HFPRUNE_CACHE") or Path.home() / ".cache" / "hfprune")


def cached_member(package: str, member: str, cached_name: str, what: str) -> Path:
    """``member`` of ``package`` as ``cache_dir() / cached_name``, downloaded on first use; ``what`` names it
    in errors."""
    return cached_file(
        package, cached_name, what, lambda deb: extract_member(deb, member), f"its file {member}"
    )


def cached_file(
    package: str, cached_name: str, what: str, build: Callable[[Path], bytes], by_hand: str
) -> Path:
    """``cache_dir() / cached_name``, written on first use as ``build(deb)`` of ``package``'s downloaded .deb.

    The file appears whole or not at all (written beside it, then renamed). ``what`` names the
    data and ``by_hand`` what a user without apt-get can put there instead, in errors.
    """
    target = cache_dir() / cached_name
    if not target.is_file():
        if shutil.which("apt-get") is None:
            raise HfpruneError(
                f"{what} comes from the Debian package {package}, and apt-get is not available; "
                f"put {by_hand} at {target} yourself"
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as workdir:
            content = build(download_deb(Path(workdir), package))
        write_atomically(target, lambda path: path.write_bytes(content))
    return target


def download_deb(workdir: Path, package: str) -> Path:
    """``package``'s .deb, downloaded into ``workdir``."""
    done = subprocess.run(["apt-get", "download", package], cwd=workdir, capture_output=True, text=True)
    debs = sorted(workdir.glob(f"{package}_*.deb"))
    if done.returncode != 0 or not debs:
        raise HfpruneError(
            f"apt-get download {package} failed: {(done.stderr or done.stdout).strip()[-500:]}"
        )
    return debs[0]


def extract_member(deb: Path, member: str) -> bytes:
    """One file from a .deb: an ar archive whose ``data.tar.*`` holds the package's files."""
    with deb.open("rb") as handle:
        if handle.read(8) != b"!<arch>\n":
            raise HfpruneError(f"{deb} is not a Debian package")
        while header := handle.read(60):
            name = header[:16].decode().strip().rstrip("/")
            size = int(header[48:58].decode().strip())
            payload = handle.read(size)
            handle.read(size % 2)  # ar pads members to an even length
            if name.startswith("data.tar"):
                with tarfile.open(fileobj=io.BytesIO(payload)) as archive:
                    for candidate in (member, "./" + member):
                        try:
                            return archive.extractfile(candidate).read()
                        except KeyError:
                            continue
                raise HfpruneError(f"{deb.name} has no {member}")
    raise HfpruneError(f"{deb.name} has no data archive")
