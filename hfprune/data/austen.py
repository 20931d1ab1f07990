"""Jane Austen's six novels (public domain, about 717k words), the LD-Net language model's training text.

They ship in the Debian package ``r-cran-janeaustenr`` as an R lazy-load database: an
index (``Rdata.rdx``, a gzip-compressed R serialization mapping each novel to the offset and
length of its record) and the records (``Rdata.rdb``), each one R-serialized character
vector, one line of the novel per element. :func:`read_lazyload` reads that format with the
``rdata`` package, so no R is needed. The text is never part of this repository: it is
downloaded once and cached as JSON (:mod:`hfprune.data.debian`).
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import struct
import warnings
import zlib
from pathlib import Path

from hfprune.data.debian import cached_file, extract_member
from hfprune.errors import HfpruneError

PACKAGE = "r-cran-janeaustenr"
DATABASE = "usr/lib/R/site-library/janeaustenr/data/Rdata"
CACHED_NAME = "jane-austen.json"
NOVELS = (
    "sensesensibility",
    "prideprejudice",
    "mansfieldpark",
    "emma",
    "northangerabbey",
    "persuasion",
)  # publication order


def austen_path() -> Path:
    """The cached novels (JSON: novel name to its lines), downloaded and converted on first use."""
    return cached_file(
        PACKAGE, CACHED_NAME, "the Jane Austen text", _novels_json, "the novels as JSON (name to lines)"
    )


def _novels_json(deb: Path) -> bytes:
    records = read_lazyload(extract_member(deb, DATABASE + ".rdx"), extract_member(deb, DATABASE + ".rdb"))
    novels = {
        name: ["" if line is None else str(line) for line in records[name]] for name in NOVELS
    }  # NA: no text
    return json.dumps(novels).encode("utf-8")


def read_austen(path: str | Path | None = None) -> dict[str, list[str]]:
    """Each novel's lines, in publication order (blank lines kept: they separate paragraphs)."""
    path = Path(path) if path is not None else austen_path()
    novels = json.loads(path.read_text(encoding="utf-8"))
    missing = [name for name in NOVELS if name not in novels]
    if missing:
        raise HfpruneError(f"{path} lacks {', '.join(missing)}: delete it to download the text again")
    return {name: novels[name] for name in NOVELS}


def read_lazyload(index: bytes, database: bytes) -> dict[str, object]:
    """Every variable of an R lazy-load database (``.rdx`` and ``.rdb`` contents), converted by ``rdata``."""
    import rdata

    with warnings.catch_warnings():  # rdata warns that a bare serialization has no file header
        warnings.simplefilter("ignore", UserWarning)
        table = rdata.conversion.convert(rdata.parser.parse_data(gzip.decompress(index)))
        return {
            str(name): rdata.conversion.convert(
                rdata.parser.parse_data(_record(database[offset : offset + length]))
            )
            for name, (offset, length) in table["variables"].items()
        }


def _record(blob: bytes) -> bytes:
    """One record's R serialization: a 4-byte big-endian length, then zlib data, or a type byte and its
    payload."""
    size = struct.unpack(">I", blob[:4])[0]
    kind, payload = blob[4:5], blob[5:]
    if kind == b"Z":
        data = lzma.decompress(payload, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2}])
    elif kind == b"2":
        data = bz2.decompress(payload)
    elif kind == b"0":
        data = payload
    else:  # compress = TRUE: plain zlib after the length (its first byte is the zlib header, not a type)
        data = zlib.decompress(blob[4:])
    if len(data) != size:
        raise HfpruneError(f"an R lazy-load record decompressed to {len(data)} bytes, its header says {size}")
    return data
