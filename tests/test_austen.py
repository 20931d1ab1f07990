"""The Jane Austen reader: R lazy-load databases (index, record forms, size check) and the cached JSON."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import struct
import zlib

import pytest

from hfprune.data.austen import NOVELS, _record, read_austen, read_lazyload
from hfprune.errors import HfpruneError

NILVALUE, SYM, LIST, CHAR, LGL, INT, STR, VEC = 254, 1, 2, 9, 10, 13, 16, 19
HAS_ATTRIBUTES, HAS_TAG = 0x200, 0x400
UTF8, ASCII = 8 << 12, 64 << 12  # CHARSXP encoding flags: gp bits 3 and 6, stored from bit 12


def _char(text: str | None) -> bytes:
    if text is None:  # NA_STRING
        return struct.pack(">2i", CHAR, -1)
    data = text.encode()
    return struct.pack(">2i", CHAR | (ASCII if text.isascii() else UTF8), len(data)) + data


def _sexp(value) -> bytes:
    """bool: logical(1); tuple: integer vector; list: character vector; dict: list, named when not empty."""
    if isinstance(value, bool):
        return struct.pack(">3i", LGL, 1, value)
    if isinstance(value, tuple):
        return struct.pack(f">2i{len(value)}i", INT, len(value), *value)
    if isinstance(value, list):
        return struct.pack(">2i", STR, len(value)) + b"".join(map(_char, value))
    if not value:
        return struct.pack(">2i", VEC, 0)
    names = (
        struct.pack(">2i", LIST | HAS_TAG, SYM)
        + _char("names")
        + _sexp(list(value))
        + struct.pack(">i", NILVALUE)
    )
    return struct.pack(">2i", VEC | HAS_ATTRIBUTES, len(value)) + b"".join(map(_sexp, value.values())) + names


def serialize(value, version: int = 2) -> bytes:
    """R's XDR serialization of ``value``, written by hand.

    The real database comes inside a downloaded Debian package and is never committed, so the
    tests build tiny ones with the same layout (what ``rdata``'s parser reads: header ``X\\n``,
    format version, R version, minimum R version, native encoding from version 3, then the object).
    """
    header = b"X\n" + struct.pack(">3i", version, 0x040300, 0x020300)
    if version == 3:
        header += struct.pack(">i", 5) + b"UTF-8"
    return header + _sexp(value)


def pack(raw: bytes, kind: bytes | None) -> bytes:
    """One ``.rdb`` record: the big-endian length, then zlib (kind None, compress=TRUE) or kind and
    payload."""
    size = struct.pack(">I", len(raw))
    if kind is None:
        return size + zlib.compress(raw)
    if kind == b"Z":  # R's preset, with a small dictionary: the default one takes 60 ms to set up
        lzma2 = {"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "dict_size": 1 << 16}
        return size + kind + lzma.compress(raw, format=lzma.FORMAT_RAW, filters=[lzma2])
    return size + kind + (bz2.compress(raw) if kind == b"2" else raw)


@pytest.mark.parametrize("kind", [b"Z", b"2", b"0"])
def test_read_lazyload_reads_every_variable(kind):
    novels = {"emma": ["EMMA", "", "Café au lait, “quoted”."], "persuasion": ["Sir Walter Elliot"] * 3}
    first, second = pack(serialize(novels["emma"]), None), pack(serialize(novels["persuasion"]), kind)
    variables = {"emma": (0, len(first)), "persuasion": (len(first), len(second))}
    index = gzip.compress(
        serialize({"variables": variables, "references": {}, "compressed": True}, version=3)
    )
    records = read_lazyload(index, first + second)
    assert {name: [str(line) for line in lines] for name, lines in records.items()} == novels


@pytest.mark.parametrize("kind", [None, b"Z", b"2", b"0"])
def test_record_whose_length_disagrees_is_refused(kind):
    raw = serialize(["one line"])
    assert _record(pack(raw, kind)) == raw
    blob = struct.pack(">I", len(raw) + 1) + pack(raw, kind)[4:]
    with pytest.raises(
        HfpruneError, match=rf"decompressed to {len(raw)} bytes, its header says {len(raw) + 1}"
    ):
        _record(blob)


def test_read_austen_orders_the_novels_and_names_the_missing(tmp_path):
    path = tmp_path / "jane-austen.json"
    novels = {name: [name.upper(), ""] for name in reversed(NOVELS)} | {"lovefreindship": ["extra"]}
    path.write_text(json.dumps(novels), encoding="utf-8")
    assert list(read_austen(path).items()) == [(name, [name.upper(), ""]) for name in NOVELS]
    del novels["emma"], novels["persuasion"]
    path.write_text(json.dumps(novels), encoding="utf-8")
    with pytest.raises(HfpruneError, match="lacks emma, persuasion: delete it"):
        read_austen(path)
