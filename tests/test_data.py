"""Dataset helpers: the deterministic split and the movie-review polarity reader."""

from __future__ import annotations

import io
import tarfile

import pytest

from hfprune.data import split
from hfprune.data.debian import extract_member
from hfprune.data.polarity import MEMBER, read_polarity
from hfprune.errors import HfpruneError


def test_split_is_deterministic_and_disjoint():
    examples = [([str(i)], ["O"]) for i in range(100)]
    train, test = split(examples, 0.2, seed=7)
    assert (train, test) == split(examples, 0.2, seed=7)
    assert len(test) == 20 and len(train) == 80
    assert sorted(int(x[0][0]) for x in train + test) == list(range(100))
    assert test != split(examples, 0.2, seed=8)[1]


POLARITY_CSV = '\ufeff"1","a "" quoted "" gem , with commas . \n"\n"-1","flat\n"\n"1","good"\n'


def test_read_polarity_parses_the_packaged_csv_format(tmp_path):
    path = tmp_path / "polarity.csv"
    path.write_text(POLARITY_CSV, encoding="utf-8")  # BOM, doubled quotes, newlines inside quotes
    assert read_polarity(path) == [('a " quoted " gem , with commas .', 1), ("flat", 0), ("good", 1)]


def test_read_polarity_names_the_bad_row(tmp_path):
    path = tmp_path / "polarity.csv"
    path.write_text('"1","fine"\n"0","neither"\n', encoding="utf-8")
    with pytest.raises(HfpruneError, match=r"row 2: expected"):
        read_polarity(path)


def _deb_with(member: str, content: bytes) -> bytes:
    """A minimal Debian package: an ar archive holding debian-binary and data.tar.xz."""
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:xz") as archive:
        info = tarfile.TarInfo("./" + member)
        info.size = len(content)
        archive.addfile(info, io.BytesIO(content))
    out = io.BytesIO()
    out.write(b"!<arch>\n")
    for name, payload in ((b"debian-binary", b"2.0\n"), (b"data.tar.xz", data.getvalue())):
        out.write(
            name.ljust(16)
            + b"0".ljust(12)
            + b"0".ljust(6)
            + b"0".ljust(6)
            + b"100644".ljust(8)
            + str(len(payload)).encode().ljust(10)
            + b"`\n"
        )
        out.write(payload + b"\n" * (len(payload) % 2))
    return out.getvalue()


def test_extract_member_reads_one_file_out_of_a_deb(tmp_path):
    deb = tmp_path / "python3-pattern_1_all.deb"
    deb.write_bytes(_deb_with(MEMBER, POLARITY_CSV.encode()))
    assert extract_member(deb, MEMBER) == POLARITY_CSV.encode()
    with pytest.raises(HfpruneError, match="has no usr/share/doc/other"):
        extract_member(deb, "usr/share/doc/other")
