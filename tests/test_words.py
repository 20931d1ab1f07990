"""Word vocabularies with an unknown-word token per word shape (hfprune_ldnet.words)."""

from __future__ import annotations

import pytest

from hfprune_ldnet.words import PAD, SHAPES, WordVocabulary, shape, split_words


def test_split_words_keeps_case_inner_apostrophes_and_punctuation():
    assert split_words('Mr. Darcy\'s letter -- "unjust!"') == [
        "Mr",
        ".",
        "Darcy's",
        "letter",
        "-",
        "-",
        '"',
        "unjust",
        "!",
        '"',
    ]


@pytest.mark.parametrize(
    "word, expected",
    [
        ("Wentworth", "<unk-Cap>"),
        ("NASA", "<unk-CAPS>"),
        ("I", "<unk-Cap>"),
        ("2018", "<unk-num>"),
        ("4ever", "<unk-num>"),
        ("@austen", "<unk-@>"),
        ("#regency", "<unk-#>"),
        ("http://t.co/x", "<unk-url>"),
        ("www.example.org", "<unk-url>"),
        ("...", "<unk-punct>"),
        ("@", "<unk-punct>"),
        ("barouche", "<unk>"),
    ],
)
def test_an_unknown_word_becomes_its_shape(word, expected):
    assert shape(word) == expected
    assert set(SHAPES) >= {expected}


def test_vocabulary_ids_specials_first_then_words_and_shapes_for_the_rest():
    vocabulary = WordVocabulary.most_frequent("the the the of of and Emma".split(), size=len(SHAPES) + 3)
    assert vocabulary.words[: 1 + len(SHAPES)] == [PAD, *SHAPES]
    assert vocabulary.words[1 + len(SHAPES) :] == ["the", "of"]  # size counts the special tokens
    assert vocabulary.ids(["of", "Emma", "and"]) == [
        len(SHAPES) + 2,
        vocabulary.id("<unk-Cap>"),
        vocabulary.id("<unk>"),
    ]


def test_an_extended_vocabulary_keeps_every_id_and_round_trips_through_a_file(tmp_path):
    base = WordVocabulary(["the", "of"])
    extended = base.extended(["of", "Bath", "the", "Lyme"])
    assert extended.words == base.words + ["Bath", "Lyme"]
    extended.save(tmp_path / "vocabulary.json")
    assert WordVocabulary.load(tmp_path / "vocabulary.json").words == extended.words
