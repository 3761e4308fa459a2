"""ref.tokenizer.clean against CLIP's own cleaning (openai/CLIP simple_tokenizer.py: basic_clean = ftfy.fix_text, then
html.unescape twice, strip; whitespace_clean with the `regex` module's \\s; lower()), with ftfy: the 21 kinds of text of
tests/test_tokenizer.py and random strings of the characters ftfy's repairs touch. Skipped without ftfy and regex
(requirements-parity.txt installs them)."""
import html

import numpy as np
import pytest

from ref.tokenizer import clean
from tests.helpers import TEXT_KINDS

ftfy = pytest.importorskip("ftfy")
regex = pytest.importorskip("regex")


def clip_clean(text):
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip().lower()


@pytest.mark.parametrize("kind", TEXT_KINDS)
def test_each_kind_of_text_is_cleaned_as_clip_cleans_it(kind):
    text, cleaned = TEXT_KINDS[kind]
    assert clip_clean(text) == cleaned == clean(text)


# What the random strings are made of: ASCII letters, space and punctuation, curly quotes and primes, ligatures,
# full-width and half-width forms, combining marks, CJK, Greek, emoji, control characters, entities. No Latin-1
# letters: beside symbols they can read as mojibake to ftfy's fix_encoding, which is not written here ("ß" + "￠"
# -> "ß¢" -> "ߢ"); TEXT_KINDS holds accented words.
PIECES = [*"abcXYZ019 .,!?'\"<>&;\t\n", *"\u2018\u2019\u201a\u201b\u201c\u201d\u201e\u201f\u02bc\u2032\u2033",
          *"\ufb00\ufb01\ufb02\ufb03\ufb04\ufb05\ufb06\u0132\u0133\u0149\u01c4\u01c7\u01ca\u01f1",
          *"\uff01\uff10\uff21\uff41\uff5e\uff61\uff76\uff9e\uffe8\u3000", *"\u0301\u0308",
          *"\u6771\u4eac\u03a3\u03c3\u0416", "\U0001f431", "\U0001f44d\U0001f3fd",
          *"\x00\x07\x1c\x7f\ufeff\u206a\ufffc",
          "&amp;", "&rsquo;", "&ldquo;", "&#8217;", "&lt;", "&amp;amp;", "&#955;"]


def test_random_strings_are_cleaned_as_clip_cleans_them():
    generator = np.random.default_rng(0)
    for _ in range(2000):
        text = "".join(generator.choice(PIECES, size=generator.integers(1, 24)))
        assert clean(text) == clip_clean(text), repr(text)
