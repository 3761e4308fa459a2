"""CLIP BPE tokenizer (ref.tokenizer): hand-made merges in the three file layouts with ids worked out by hand, the
byte table, CLIP's word pattern against the Unicode database, CLIP's cleaning on 21 kinds of text, padding and
truncation to 77, files of the wrong kind, and the real vocabulary's known encodings when CLIP_BPE_PATH points at it."""
import gzip
import json
import os
import unicodedata

import pytest

from ref.tokenizer import CLIPTokenizer, bytes_to_unicode, clean, pre_tokenizer
from tests.helpers import TEXT_KINDS, write_tokenizer_json

# Ranks 0..5. "cat": c a t</w> -> (c, a) rank 0 first -> ca t</w> -> cat</w>; merging (a, t</w>) first would end at
# c at</w>. "aaaa": (a, a) merged left to right, not overlapping: aa a a</w>.
MERGES = ["c a", "ca t</w>", "t h", "th e</w>", "a t</w>", "a a"]
HEADER = "#version: 0.2"


def write_gz(path, lines):
    with gzip.open(path, "wt", encoding="utf-8") as file:
        file.write("\n".join(lines) + "\n")
    return str(path)


def write_folder(folder, vocabulary, merge_lines):
    folder.mkdir(exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocabulary), encoding="utf-8")
    (folder / "merges.txt").write_text("\n".join(merge_lines) + "\n", encoding="utf-8")
    return str(folder)


def hand_vocabulary():
    """CLIP's numbering spelled out: the 256 byte symbols, the same with </w> (+256), one id per merge from 512, then
    <|startoftext|>, <|endoftext|>."""
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in MERGES]
    return {token: index for index, token in enumerate(tokens + ["<|startoftext|>", "<|endoftext|>"])}


@pytest.fixture
def gz_tokenizer(tmp_path):
    return CLIPTokenizer.from_path(write_gz(tmp_path / "merges.txt.gz", [HEADER, *MERGES]))


def test_bytes_to_unicode_is_gpt2s_table():
    table = bytes_to_unicode()
    assert len(set(table.values())) == 256
    assert all(table[byte] == chr(byte) for byte in [*range(33, 127), *range(161, 173), *range(174, 256)])
    assert (table[0], table[ord("\n")], table[ord(" ")], table[127], table[173]) == ("Ā", "Ċ", "Ġ", "ġ", "Ń")
    assert list(table)[:3] == [ord("!"), ord('"'), ord("#")] and list(table)[-1] == 173


def test_merges_file_gives_clips_numbering(gz_tokenizer):
    # a=64, t=83 ('!' is 0); </w> adds 256; merges are 512 + rank; start, end = 518, 519
    assert gz_tokenizer.encode("the cat") == [515, 513]
    assert gz_tokenizer.encode("tat") == [83, 516]
    assert gz_tokenizer.encode("aaaa") == [517, 64, 320]
    assert gz_tokenizer.encode("  The\tCAT!  ") == [515, 513, 256]
    assert (gz_tokenizer.start_id, gz_tokenizer.end_id, gz_tokenizer.pad_id) == (518, 519, 519)


def test_vocab_json_ids_are_used_as_written(tmp_path):
    """The same merges with every id permuted: the ids come from vocab.json."""
    vocabulary = {token: 1000 - index for index, token in enumerate(hand_vocabulary())}
    tokenizer = CLIPTokenizer.from_path(write_folder(tmp_path / "tokenizer", vocabulary, [HEADER, *MERGES]))
    assert tokenizer.encode("the cat tat") == [vocabulary[t] for t in ("the</w>", "cat</w>", "t", "at</w>")]
    assert tokenizer([""])[0, :3].tolist() == [vocabulary["<|startoftext|>"], *2 * [vocabulary["<|endoftext|>"]]]


def test_non_ascii_words_are_bytes_and_decode_back(gz_tokenizer):
    """é is two UTF-8 bytes, c3 a9: two byte symbols, the last with </w>."""
    symbols = list(bytes_to_unicode())
    assert gz_tokenizer.encode("é") == [symbols.index(0xC3), symbols.index(0xA9) + 256]
    assert gz_tokenizer.decode(gz_tokenizer.encode("The cat é!")) == "the cat é ! "


@pytest.mark.parametrize("pairs", [True, False], ids=["pairs", "strings"])
def test_tokenizer_json_gives_the_ids_of_vocab_json_and_merges(tmp_path, pairs):
    vocabulary = {token: 1000 - index for index, token in enumerate(hand_vocabulary())}
    from_json = CLIPTokenizer.from_path(write_tokenizer_json(tmp_path / "json", vocabulary, MERGES, pairs))
    from_files = CLIPTokenizer.from_path(write_folder(tmp_path / "files", vocabulary, [HEADER, *MERGES]))
    assert from_json.ids == from_files.ids and from_json.ranks == from_files.ranks
    assert from_json(["the cat tat", ""]).tolist() == from_files(["the cat tat", ""]).tolist()


def test_tokenizer_json_of_another_model_is_refused(tmp_path):
    folder = write_tokenizer_json(tmp_path / "t5", hand_vocabulary(), MERGES, model_type="Unigram")
    with pytest.raises(ValueError, match=r"tokenizer\.json: a Unigram model with end_of_word_suffix '</w>'; CLIP's"):
        CLIPTokenizer.from_path(folder)
    (tmp_path / "t5" / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE"}}))
    with pytest.raises(ValueError, match=r"expected a tokenizers-library file whose \"model\" holds a BPE"):
        CLIPTokenizer.from_path(folder)


@pytest.mark.parametrize("kind", TEXT_KINDS)
def test_text_is_cleaned_as_clips_reference_cleans_it(kind):
    text, cleaned = TEXT_KINDS[kind]
    assert clean(text) == cleaned


def test_curly_quotes_ligatures_and_full_width_give_the_plain_texts_tokens(gz_tokenizer):
    """The three SD1.5-pipeline cases that tokenized differently before the repairs, and a long curly prompt cut at
    77 as the straight one is."""
    for repaired, plain in (("don\u2019t", "don't"), ("\ufb01ne", "fine"), ("１２３", "123"), ("ＣＡＴ", "cat")):
        assert gz_tokenizer.encode(repaired) == gz_tokenizer.encode(plain)
    with pytest.warns(UserWarning, match="truncated"):
        curly, straight = gz_tokenizer([" ".join(["\u2018cat\u2019"] * 40), " ".join(["'cat'"] * 40)])
    assert curly.tolist() == straight.tolist() and curly[-1] == gz_tokenizer.end_id


def test_html_entities_are_unescaped_twice_and_text_is_nfc_normalised(gz_tokenizer):
    assert gz_tokenizer.encode("cat&amp;amp;the") == gz_tokenizer.encode("cat & the")
    assert gz_tokenizer.encode("cafe\u0301") == gz_tokenizer.encode("caf\u00e9")  # e + combining acute = é


def test_word_pattern_splits_as_clips():
    words = pre_tokenizer().findall("it's <|endoftext|>x² 42 snake_case Ⅻ café...")
    assert words == ["it", "'s", "<|endoftext|>", "x", "²", "4", "2", "snake", "_", "case", "Ⅻ", "café", "..."]


def test_word_pattern_classes_are_unicode_letters_and_numbers():
    """Each character c of the BMP in "a{c}1{c}!": a letter (L) joins the letters before it, a number (N) stands
    alone, any other non-space joins the punctuation after it, whitespace separates."""
    pattern = pre_tokenizer()
    for code in range(0x10000):
        c = chr(code)
        if c == "'" or 0xD800 <= code < 0xE000:
            continue
        kind = "space" if c.isspace() else unicodedata.category(c)[0]
        expected = {"L": [f"a{c}", "1", c, "!"], "N": ["a", c, "1", c, "!"], "space": ["a", "1", "!"]}.get(
            kind, ["a", c, "1", f"{c}!"])
        assert pattern.findall(f"a{c}1{c}!") == expected, (hex(code), kind)


def test_prompts_are_padded_with_the_end_token_to_77(gz_tokenizer):
    tokens = gz_tokenizer(["the cat", "cat"])
    assert tokens.shape == (2, 77) and tokens.dtype.is_signed
    assert tokens[0].tolist() == [518, 515, 513] + [519] * 74
    assert tokens[1].tolist() == [518, 513] + [519] * 75


def test_long_prompts_keep_75_tokens_and_the_end_token_with_a_warning(gz_tokenizer):
    with pytest.warns(UserWarning, match="has 80 tokens, 75 fit in 77 positions; truncated"):
        tokens = gz_tokenizer([" ".join(["cat"] * 80)])
    assert tokens[0].tolist() == [518] + [513] * 75 + [519]


# ---------------------------------------------------------------------------------------------------------------------
# Files of the wrong kind
# ---------------------------------------------------------------------------------------------------------------------

def test_a_file_that_is_not_gzip_is_refused(tmp_path):
    (tmp_path / "bpe.txt.gz").write_text("\n".join([HEADER, *MERGES]))
    with pytest.raises(ValueError, match=r"bpe\.txt\.gz: expected bpe_simple_vocab_16e6\.txt\.gz, gzip-compressed"):
        CLIPTokenizer.from_path(str(tmp_path / "bpe.txt.gz"))


def test_gzip_text_that_is_not_merges_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"vocab\.gz: expected a BPE merges file whose first line is a '#version'"):
        CLIPTokenizer.from_path(write_gz(tmp_path / "vocab.gz", [json.dumps(hand_vocabulary())]))
    with pytest.raises(ValueError, match=r"broken\.gz: line 3 should be one merge"):
        CLIPTokenizer.from_path(write_gz(tmp_path / "broken.gz", [HEADER, "c a", "ca t</w> x"]))
    with pytest.raises(ValueError, match=r"empty\.gz: no merges after the header"):
        CLIPTokenizer.from_path(write_gz(tmp_path / "empty.gz", [HEADER]))


def test_tokenizer_folders_of_the_wrong_kind_are_refused(tmp_path):
    vocabulary = hand_vocabulary()
    without_specials = {k: v for k, v in vocabulary.items() if k not in ("<|startoftext|>", "<|endoftext|>")}
    folder = write_folder(tmp_path / "no_specials", without_specials, [HEADER, *MERGES])
    with pytest.raises(ValueError, match=r"vocab\.json: the vocabulary lacks 2 token\(s\).*<\|startoftext\|>"):
        CLIPTokenizer.from_path(folder)
    folder = write_folder(tmp_path / "list", list(vocabulary), [HEADER, *MERGES])
    with pytest.raises(ValueError, match=r"vocab\.json: expected a JSON object mapping each token to an integer id"):
        CLIPTokenizer.from_path(folder)
    (tmp_path / "list" / "vocab.json").write_text("#version: 0.2\nc a\n")
    with pytest.raises(ValueError, match=r"vocab\.json: expected a JSON object mapping tokens to ids"):
        CLIPTokenizer.from_path(folder)
    (tmp_path / "list" / "merges.txt").unlink()
    with pytest.raises(ValueError, match=r"holding vocab\.json and merges\.txt, or tokenizer\.json; missing"):
        CLIPTokenizer.from_path(folder)
    with pytest.raises(ValueError, match=r"give the folder holding vocab\.json and merges\.txt"):
        CLIPTokenizer.from_path(os.path.join(folder, "vocab.json"))
    with pytest.raises(ValueError, match=r"no such file or folder"):
        CLIPTokenizer.from_path(str(tmp_path / "absent.gz"))


# ---------------------------------------------------------------------------------------------------------------------
# The real vocabulary
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.skipif(not os.environ.get("CLIP_BPE_PATH"), reason="CLIP_BPE_PATH (bpe_simple_vocab_16e6.txt.gz or a "
                    "tokenizer folder with vocab.json and merges.txt) not set")
def test_the_real_vocabulary_gives_the_published_ids():
    """"a photo of a cat" and "Hello, world!" as CLIP's, transformers' and open_clip's tokenizers encode them."""
    tokenizer = CLIPTokenizer.from_path(os.environ["CLIP_BPE_PATH"])
    assert (len(tokenizer.ids), tokenizer.start_id, tokenizer.end_id) == (49408, 49406, 49407)
    tokens = tokenizer(["a photo of a cat", "Hello, world!", "A PHOTO of  a Cat!"])
    assert tokens[0].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407] + [49407] * 70
    assert tokens[1, :6].tolist() == [49406, 3306, 267, 1002, 256, 49407]
    assert tokens[2, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 256, 49407]
