"""The embedded story generator: determinism, shape, variety, consistency of names and pronouns, and that the
corpus has structure a model can learn."""

from __future__ import annotations

import hashlib
import itertools
import math
import os
import re
import subprocess
import sys
import time
from collections import Counter

import pytest

from anetrain.data import stories
from anetrain.data.stories import (
    ALL_NAMES,
    PLOT_NAMES,
    Story,
    generate_stories,
    generate_story_records,
    write_corpus,
)
from anetrain.errors import AnetrainError

FEMALE = frozenset({"she", "her", "hers", "herself"})
MALE = frozenset({"he", "him", "his", "himself"})
SENTENCE_END = re.compile(r'(?<=[.!?])"?\s+')


def words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z']+", text)


@pytest.fixture(scope="module")
def records() -> list[Story]:
    return generate_story_records(2000, seed=0)


@pytest.fixture(scope="module")
def texts(records: list[Story]) -> list[str]:
    return [r.text for r in records]


# --- determinism --------------------------------------------------------------------------------------------


def test_same_seed_same_text_and_different_seeds_differ() -> None:
    a = generate_stories(300, seed=5)
    assert a == generate_stories(300, seed=5)
    b = generate_stories(300, seed=6)
    assert sum(x != y for x, y in zip(a, b, strict=True)) >= 295
    assert generate_stories(10, seed=5) == a[:10]  # a prefix of a longer run
    assert generate_stories(0, seed=5) == []


def test_same_corpus_in_fresh_processes_with_different_hash_seeds() -> None:
    """Guards against string-hash order (sets, dict of sets) leaking into the output: byte-identical text."""
    code = (
        "import hashlib; from anetrain.data.stories import generate_stories; "
        "print(hashlib.sha256('\\n\\n'.join(generate_stories(200, 7)).encode()).hexdigest())"
    )
    here = hashlib.sha256("\n\n".join(generate_stories(200, 7)).encode()).hexdigest()
    for hash_seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        assert out.stdout.strip() == here


def test_negative_count_is_an_input_error() -> None:
    with pytest.raises(AnetrainError, match="at least 0"):
        generate_stories(-1)


# --- shape --------------------------------------------------------------------------------------------------


def test_lengths_ascii_and_layout(texts: list[str]) -> None:
    counts = [len(t.split()) for t in texts]
    assert min(counts) >= 60 and max(counts) <= 250
    assert 100 <= sum(counts) / len(counts) <= 180
    for t in texts:
        assert t.isascii()
        assert "{" not in t and "}" not in t, t  # every slot filled
        assert "\n\n" not in t and t == t.strip() and "  " not in t
        for paragraph in t.split("\n"):
            assert paragraph and paragraph == paragraph.strip()
            assert paragraph[0].isupper() or paragraph[0] == '"', paragraph
            assert paragraph.count('"') % 2 == 0, paragraph  # quotes balanced within a paragraph
            assert paragraph[-1] in '.!?"', paragraph
        # A sentence that ends outside a quote starts with a capital.
        assert not re.search(r"[.!?] [a-z]", t), t
        assert not re.search(r"\ba [aeiou]", t), t  # "a" before a vowel


def test_generates_20000_stories_quickly() -> None:
    start = time.perf_counter()
    out = generate_stories(20_000, seed=3)
    seconds = time.perf_counter() - start
    assert len(out) == 20_000
    assert seconds < 10.0, f"20,000 stories took {seconds:.1f} s"


def test_write_corpus_separates_stories_by_blank_lines(tmp_path) -> None:
    path = tmp_path / "sub" / "stories.txt"
    n_bytes = write_corpus(path, 50, seed=9)
    data = path.read_bytes()
    assert n_bytes == len(data)
    expected = generate_stories(50, seed=9)
    assert data == ("\n\n".join(expected) + "\n").encode("ascii")
    assert data.decode("ascii").rstrip("\n").split("\n\n") == expected
    assert sorted(p.name for p in path.parent.iterdir()) == ["stories.txt"]  # no temporary file left


# --- variety ------------------------------------------------------------------------------------------------


def test_variety(records: list[Story], texts: list[str]) -> None:
    assert len(set(texts)) == len(texts) == 2000  # distinct-story ratio 1.0: no story repeated
    vocabulary = {w.lower() for t in texts for w in words(t)}
    assert len(vocabulary) > 600  # about 1,000 with the current tables
    first_sentences = {SENTENCE_END.split(t, maxsplit=1)[0] for t in texts}
    assert len(first_sentences) > 1000  # about 1,800
    plots = Counter(r.plot for r in records)
    assert len(PLOT_NAMES) >= 12 and set(plots) == set(PLOT_NAMES)
    assert min(plots.values()) > 2000 / len(PLOT_NAMES) / 2  # every skeleton is used, none dominates
    # No sentence except the optional closing "The end." is in more than 10% of stories.
    sentence_counts = Counter(s for t in texts for s in set(SENTENCE_END.split(t)))
    sentence_counts.pop("The end.", None)
    assert sentence_counts.most_common(1)[0][1] < 200
    heroes = Counter((r.hero.name, r.hero.kind) for r in records)
    assert len(heroes) > 300


# --- consistency of names and pronouns ----------------------------------------------------------------------


def test_only_the_cast_is_named_and_the_hero_is_named_often(records: list[Story]) -> None:
    """Every first name in a story is the hero's or the friend's, and the hero's name appears in the opening
    paragraph and at least three times in all: the cast does not change names halfway through."""
    known = set(ALL_NAMES)
    for r in records:
        named = {w for w in words(r.text) if w in known}
        friend = r.others[0]
        assert named <= {r.hero.name, friend.name}, r.text
        assert r.hero.name != friend.name
        assert r.hero.name in words(r.text.split("\n")[0])
        assert words(r.text).count(r.hero.name) >= 3, r.text


def test_hero_kind_matches_gender(records: list[Story]) -> None:
    """A human hero introduced as a "girl" is female and a "boy" male; the kind word is in the opening."""
    for r in records:
        if r.hero.kind in ("girl", "boy"):
            assert r.hero.female == (r.hero.kind == "girl")
        assert r.hero.kind in words(r.text.split("\n")[0])


def test_sentences_about_only_the_hero_use_the_heros_pronouns(records: list[Story]) -> None:
    """Precisely: in every sentence that contains the hero's name and no word naming another character (the
    friend's name or kind, the parent word, the helper's words), no third-person pronoun of the other gender
    occurs. Sentences are split after . ! or ? (and a closing quote)."""
    checked = with_pronoun = 0
    for r in records:
        other_words = set()
        for c in r.others:
            other_words |= {w.lower() for w in words(f"{c.name} {c.kind}")}
        wrong = MALE if r.hero.female else FEMALE
        own = FEMALE if r.hero.female else MALE
        for sentence in SENTENCE_END.split(r.text):
            tokens = words(sentence)
            lower = {w.lower() for w in tokens}
            if r.hero.name not in tokens or lower & other_words:
                continue
            checked += 1
            with_pronoun += bool(lower & own)
            assert not lower & wrong, (r.hero, sentence)
    assert checked > 10_000 and with_pronoun > 2_000  # the check covers a lot of text


def test_stories_whose_cast_shares_one_gender_never_use_the_other(records: list[Story]) -> None:
    """Precisely: when the hero, the friend, the parent and the helper are all female (all male), the story
    contains no he/him/his/himself (no she/her/hers/herself) anywhere, dialogue included. Unnamed animals and
    objects are "it"."""
    checked = 0
    for r in records:
        genders = {r.hero.female} | {c.female for c in r.others}
        if len(genders) != 1:
            continue
        checked += 1
        wrong = MALE if r.hero.female else FEMALE
        assert not {w.lower() for w in words(r.text)} & wrong, r.text
    assert checked > 150  # about one story in eight


# --- learnability -------------------------------------------------------------------------------------------


def tokens(text: str) -> list[str]:
    return ["<s>", *re.findall(r"[a-z']+|[.,!?\"]", text.lower())]


def test_bigram_model_predicts_held_out_stories_far_better_than_unigram() -> None:
    """Structure to learn, without training a network: a word bigram model estimated on 5,000 stories
    (seed 1), interpolated with an add-one unigram (lambda 0.95), scores 500 held-out stories (seed 2) at
    about 3.6 bits per token against the unigram model's 7.8. We require bigram < 0.6 x unigram, and bigram >
    2 bits so that the text is not so repetitive that it is trivial."""
    unigram: Counter[str] = Counter()
    bigram: Counter[tuple[str, str]] = Counter()
    context: Counter[str] = Counter()
    for text in generate_stories(5000, seed=1):
        t = tokens(text)
        unigram.update(t[1:])
        bigram.update(itertools.pairwise(t))
        context.update(t[:-1])
    total, vocab = sum(unigram.values()), len(unigram) + 1
    bits_unigram = bits_bigram = 0.0
    count = 0
    for text in generate_stories(500, seed=2):
        t = tokens(text)
        for prev, word in itertools.pairwise(t):
            p_uni = (unigram[word] + 1) / (total + vocab)
            p_bi = bigram[prev, word] / context[prev] if context[prev] else 0.0
            bits_unigram -= math.log2(p_uni)
            bits_bigram -= math.log2(0.95 * p_bi + 0.05 * p_uni)
            count += 1
    h_uni, h_bi = bits_unigram / count, bits_bigram / count
    assert count > 50_000
    assert 6.5 < h_uni < 9.5, h_uni
    assert 2.0 < h_bi < 0.6 * h_uni, (h_bi, h_uni)


def test_module_keeps_randomness_local() -> None:
    """Only random.Random instances: the global random state is neither used nor changed."""
    import random

    state = random.getstate()
    generate_stories(20, seed=0)
    assert random.getstate() == state
    with open(stories.__file__, encoding="utf-8") as f:
        assert "random.seed" not in f.read()
