"""Movie-review polarity sentences (Pang & Lee): 2,000 positive and 2,000 negative.

They ship in the Debian package ``python3-pattern`` as a CSV whose rows are
``"1",text`` or ``"-1",text``. The licence of the corpus is unclear, so it is never part of
this repository: :func:`polarity_path` downloads the package once with ``apt-get download``
(no root needed) and keeps only the CSV in a cache folder (``$HFPRUNE_CACHE``, default
``~/.cache/hfprune``).
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from hfprune.errors import HfpruneError

PACKAGE = "python3-pattern"
MEMBER = "usr/share/doc/python3-pattern/test/corpora/polarity-en-pang&lee2.csv"
CACHED_NAME = "polarity-pang-lee2.csv"

Example = tuple[str, int]


def cache_dir() -> Path:
    return Path(os.environ.get("HFPRUNE_CACHE") or Path.home() / ".cache" / "hfprune")


def polarity_path() -> Path:
    """The cached CSV, downloaded on first use."""
    target = cache_dir() / CACHED_NAME
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as workdir:
            extracted = _extract_member(_download_deb(Path(workdir)), MEMBER)
            temporary = target.with_name(target.name + ".tmp")
            temporary.write_bytes(extracted)
            os.replace(temporary, target)
    return target


def _download_deb(workdir: Path) -> Path:
    if shutil.which("apt-get") is None:
        raise HfpruneError(
            f"the movie-review polarity data comes from the Debian package {PACKAGE}, and apt-get is not available; "
            f"put its file {MEMBER} at {cache_dir() / CACHED_NAME} yourself"
        )
    done = subprocess.run(["apt-get", "download", PACKAGE], cwd=workdir, capture_output=True, text=True)
    debs = sorted(workdir.glob(f"{PACKAGE}_*.deb"))
    if done.returncode != 0 or not debs:
        raise HfpruneError(f"apt-get download {PACKAGE} failed: {(done.stderr or done.stdout).strip()[-500:]}")
    return debs[0]


def _extract_member(deb: Path, member: str) -> bytes:
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


def read_polarity(path: str | Path | None = None) -> list[Example]:
    """(sentence, label) pairs in file order; label 1 is positive, 0 negative."""
    path = Path(path) if path is not None else polarity_path()
    examples = []
    with path.open(encoding="utf-8-sig", newline="") as handle:
        for number, row in enumerate(csv.reader(handle), start=1):
            if len(row) != 2 or row[0] not in ("1", "-1"):
                raise HfpruneError(f"{path}: row {number}: expected '\"1\",text' or '\"-1\",text', got {row!r:.80}")
            examples.append((" ".join(row[1].split()), int(row[0] == "1")))
    return examples
