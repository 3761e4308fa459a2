"""CLIP's byte-level BPE tokenizer (openai/CLIP clip/simple_tokenizer.py), as Stable Diffusion 1.5 uses it:
prompts -> (B, 77) token ids for the text encoder of ref.clip.

Steps: clean the text; split it into words with CLIP's pattern; write each word's UTF-8 bytes as printable characters
(bytes_to_unicode), mark its last symbol with `</w>`; merge adjacent symbol pairs, lowest merge rank first, until no
pair has a rank; look the symbols up in the vocabulary. A prompt becomes <|startoftext|> (49406), its tokens,
<|endoftext|> (49407), padded to 77 with <|endoftext|>: SD1.5's FrozenCLIPEmbedder pads to max_length, and the
pad token of openai/clip-vit-large-patch14's tokenizer is <|endoftext|>. Longer prompts keep their first 75 tokens and
the end token (as the Hugging Face tokenizer with truncation=True and clip.tokenize(truncate=True)), with a warning.

The vocabulary is read from the user's files, in any of these layouts:
- `bpe_simple_vocab_16e6.txt.gz` (openai/CLIP): gzip text, a header line, then one merge "a b" per line; CLIP keeps
  the first 49152 - 256 - 2 = 48,894 merges and numbers the 256 byte symbols, the same 256 with `</w>`, one token per
  merge, then the start and end tokens: 49,408 ids.
- a folder with `vocab.json` (token -> id) and `merges.txt` (a "#version" header, then the merges): the Hugging Face
  layout, e.g. the `tokenizer/` folder of SD1.5 in the diffusers layout.
- a folder with `tokenizer.json` (the tokenizers library's format, all that transformers 5's save_pretrained writes):
  its "model" is a BPE with end_of_word_suffix `</w>`, its "vocab" the ids, its "merges" the merges in rank order
  ("a b" strings or [a, b] pairs), and "added_tokens" the start and end tokens' ids.

Cleaning (CLIP's simple_tokenizer.py: basic_clean = ftfy.fix_text, then html.unescape twice, then whitespace_clean
and lower()). Of ftfy.fix_text's steps (ftfy 6.3, its default TextFixerConfig, in its order) these are written
here, in `repair`:
- unescape_html on the lines before the first line holding a "<" (ftfy's "auto"; stdlib html.unescape here, ftfy
  also reads a few all-caps entity names);
- fix_latin_ligatures: ﬁ -> fi, ĳ -> ij, ... (the NFKC letters, but ﬅ -> ſt);
- fix_character_width: the full-width and half-width forms U+FF01-U+FFEF to their NFKC form, U+3000 to a space;
- uncurl_quotes: U+02BC and U+2018-U+201B -> ', U+201C-U+201F -> ";
- remove_control_chars: U+0000-0008, 000B, 000E-001F, 007F, 206A-206F, FEFF, FFF9-FFFC deleted;
- its NFC normalisation.
Not written: the mojibake repairs (fix_encoding, fix_c1_controls: "cafÃ©" stays as it is), terminal escapes and
surrogates; its line-break fixes only make whitespace, which whitespace_clean collapses anyway.
tests/parity/test_tokenizer_parity.py checks `clean` against CLIP's cleaning with ftfy on the 21 kinds of text of
tests/test_tokenizer.py and 2,000 random strings of the characters these repairs touch.

CLIP's pattern uses the `regex` module's \\p{L} / \\p{N}; Python's `re` lacks them, so `pre_tokenizer` builds the
same classes from \\w, \\d and the Unicode categories Nl / No, as Python's Unicode database
(unicodedata.unidata_version) defines them: characters assigned after that version may split differently. Whitespace
is Python's \\s (str.isspace), which counts U+001C-U+001F as space where `regex` does not (repair deletes them
first). On 3,000 random strings of ASCII, punctuation, numbers, accented, CJK, emoji and random assigned BMP
characters, encode(ftfy.fix_text(text)) gave openai/CLIP SimpleTokenizer's ids every time.
"""
import functools
import gzip
import html
import json
import os
import re
import sys
import unicodedata
import warnings

import torch

CONTEXT_LENGTH = 77  # the text encoder's positions
START, END = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"
NUM_MERGES = 49152 - 256 - 2  # CLIP reads merges[1:49152 - 256 - 2 + 1] of the file (line 0 is a header)


@functools.cache
def bytes_to_unicode():
    """byte -> the character that stands for it in BPE symbols: the printable Latin-1 bytes stand for themselves, the
    other 68 (controls, space, ...) take chr(256), chr(257), ... in byte order. The printable ones come first, as
    CLIP's vocabulary numbers them."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [byte for byte in range(256) if byte not in printable]
    return {**{byte: chr(byte) for byte in printable}, **{byte: chr(256 + n) for n, byte in enumerate(others)}}


@functools.cache
def pre_tokenizer():
    """CLIP's word pattern, case-insensitive,
    <\\|startoftext\\|>|<\\|endoftext\\|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+
    in Python's re. \\w is letters (L), numbers (N) and "_"; \\d is the decimal digits (Nd); the
    other numbers (Nl, No: Roman numerals, superscripts, fractions, ...) are listed from the Unicode database."""
    other_numbers = "".join(re.escape(character) for character in map(chr, range(sys.maxunicode + 1))
                            if unicodedata.category(character) in ("Nl", "No"))
    letters = rf"[^\W\d_{other_numbers}]+"  # [\p{L}]+
    number = rf"[\d{other_numbers}]"  # [\p{N}]
    other = r"(?:[^\s\w]|_)+"  # [^\s\p{L}\p{N}]+
    specials = "|".join(re.escape(token) for token in (START, END))
    return re.compile(rf"{specials}|'s|'t|'re|'ve|'m|'ll|'d|{letters}|{number}|{other}", re.IGNORECASE)


QUOTES = {**dict.fromkeys([0x02BC, *range(0x2018, 0x201C)], "'"), **dict.fromkeys(range(0x201C, 0x2020), '"')}
CONTROL_CHARACTERS = dict.fromkeys([*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070),
                                    0xFEFF, *range(0xFFF9, 0xFFFD)])
LIGATURES = {**{ord(ligature): unicodedata.normalize("NFKC", ligature) for ligature in "ĲĳŉǄǅǆǇǈǉǊǋǌǱǲǳﬀﬁﬂﬃﬄﬆ"},
             0xFB05: "\u017ft"}  # ﬅ -> ſt in ftfy (NFKC: st)
WIDTHS = {0x3000: " ", **{code: unicodedata.normalize("NFKC", chr(code)) for code in range(0xFF01, 0xFFF0)
                          if unicodedata.normalize("NFKC", chr(code)) != chr(code)}}
# ftfy's fixes run in turn (ligatures, widths, quotes, control characters); as one table, a ligature's or a wide
# form's letters are uncurled too (ŉ -> ʼn -> 'n).
REPAIRS = {**QUOTES, **CONTROL_CHARACTERS,
           **{code: letters.translate(QUOTES) for code, letters in (LIGATURES | WIDTHS).items()}}


def repair(text):
    """The part of ftfy.fix_text (CLIP's basic_clean) that changes CLIP's tokens (see the module docstring): HTML
    entities unescaped on the lines before the first line holding a "<" (ftfy fixes line by line and stops unescaping
    at such a line), ligatures and full-width forms folded, curly quotes straightened, control characters deleted,
    NFC."""
    head, tag, _ = text.partition("<")
    cut = head.rfind("\n") + 1 if tag else len(text)  # the start of the first line holding "<"
    text = html.unescape(text[:cut]) + text[cut:]
    return unicodedata.normalize("NFC", text.translate(REPAIRS))


def clean(text):
    """CLIP's basic_clean (repair for ftfy.fix_text, then html.unescape twice) + whitespace_clean + lower()."""
    text = html.unescape(html.unescape(repair(text)))
    return re.sub(r"\s+", " ", text).strip().lower()


# ---------------------------------------------------------------------------------------------------------------------
# Vocabulary files
# ---------------------------------------------------------------------------------------------------------------------

def parse_merges(text, path):
    """The text of a merges file -> [(a, b), ...] in rank order: line 0 is a header ("#version: 0.2" in both
    layouts), the next NUM_MERGES lines are merges, the rest is unused (as CLIP reads it)."""
    lines = text.rstrip("\n").split("\n")
    if "#version" not in lines[0]:
        raise ValueError(f"{path}: expected a BPE merges file whose first line is a '#version' header, "
                         f"found {lines[0][:80]!r}")
    merges = []
    for number, line in enumerate(lines[1:NUM_MERGES + 1], start=2):
        pair = tuple(line.split())
        if len(pair) != 2:
            raise ValueError(f"{path}: line {number} should be one merge, two symbols separated by a space; "
                             f"found {line[:80]!r}")
        merges.append(pair)
    if not merges:
        raise ValueError(f"{path}: no merges after the header")
    return merges


def read_merges_gz(path):
    """bpe_simple_vocab_16e6.txt.gz -> merges."""
    try:
        with gzip.open(path, "rt", encoding="utf-8") as file:
            text = file.read()
    except (gzip.BadGzipFile, EOFError, UnicodeDecodeError, OSError) as error:
        raise ValueError(f"{path}: expected bpe_simple_vocab_16e6.txt.gz, gzip-compressed UTF-8 text of BPE merges "
                         f"({error})") from None
    return parse_merges(text, path)


def read_vocab_and_merges(folder):
    """A folder with vocab.json and merges.txt (Hugging Face layout) -> merges, {token: id}."""
    vocab_path, merges_path = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
    missing = [path for path in (vocab_path, merges_path) if not os.path.isfile(path)]
    if missing:
        raise ValueError(f"{folder}: expected a tokenizer folder holding vocab.json and merges.txt, or "
                         f"tokenizer.json; missing {', '.join(missing)}")
    try:
        with open(merges_path, encoding="utf-8") as file:
            merges = parse_merges(file.read(), merges_path)
        with open(vocab_path, encoding="utf-8") as file:
            vocabulary = json.load(file)
    except UnicodeDecodeError as error:
        raise ValueError(f"{folder}: vocab.json and merges.txt should be UTF-8 text ({error})") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{vocab_path}: expected a JSON object mapping tokens to ids ({error})") from None
    if not isinstance(vocabulary, dict) or not all(isinstance(i, int) for i in vocabulary.values()):
        raise ValueError(f"{vocab_path}: expected a JSON object mapping each token to an integer id")
    return merges, vocabulary


def read_tokenizer_json(folder):
    """A folder with tokenizer.json (the tokenizers library's format) -> merges, {token: id}: the BPE model's merges
    and vocabulary, with the added tokens' ids."""
    path = os.path.join(folder, "tokenizer.json")
    try:
        with open(path, encoding="utf-8") as file:
            contents = json.load(file)
        model = contents["model"]
        kind, suffix, vocabulary, merge_list = (model.get("type"), model.get("end_of_word_suffix"), model["vocab"],
                                                model["merges"])
        added = {token["content"]: token["id"] for token in contents.get("added_tokens", [])}
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{path}: expected a tokenizers-library file whose \"model\" holds a BPE \"vocab\" and "
                         f"\"merges\" ({type(error).__name__}: {error})") from None
    if kind != "BPE" or suffix != END_OF_WORD:
        raise ValueError(f"{path}: a {kind} model with end_of_word_suffix {suffix!r}; CLIP's tokenizer is a BPE with "
                         f"{END_OF_WORD!r}")
    merges = [tuple(merge.split(" ") if isinstance(merge, str) else merge) for merge in merge_list]
    broken = [merge for merge in merges if len(merge) != 2]
    if broken or not isinstance(vocabulary, dict):
        raise ValueError(f"{path}: expected merges of two symbols and a vocabulary of ids, found e.g. {broken[:1]}")
    return merges, vocabulary | added


def clip_vocabulary(merges):
    """The vocabulary CLIP derives from its merges: byte symbols, byte symbols with </w>, one token per merge, then
    the start and end tokens. -> {token: id}"""
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [symbol + END_OF_WORD for symbol in symbols] + ["".join(pair) for pair in merges] + [START, END]
    return {token: index for index, token in enumerate(tokens)}


def check_vocabulary(vocabulary, merges, path):
    """Every token the BPE can produce (the byte symbols with and without </w>, each merge's result) and the start and
    end tokens must have an id."""
    symbols = list(bytes_to_unicode().values())
    needed = [START, END, *symbols, *(symbol + END_OF_WORD for symbol in symbols), *("".join(p) for p in merges)]
    missing = [token for token in needed if token not in vocabulary]
    if missing:
        raise ValueError(f"{path}: the vocabulary lacks {len(missing)} token(s) the merges and CLIP's special tokens "
                         f"need, e.g. {missing[:5]}; expected CLIP's vocab.json")


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------------------

class CLIPTokenizer:
    """Prompts -> (B, context_length) token ids, CLIP's byte-level BPE.

    merges: [(a, b), ...] in rank order. vocabulary: {token: id}; None derives CLIP's own numbering from the merges."""

    def __init__(self, merges, vocabulary=None, context_length=CONTEXT_LENGTH):
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.ids = clip_vocabulary(merges) if vocabulary is None else dict(vocabulary)
        self.tokens = {index: token for token, index in self.ids.items()}
        self.byte_symbols = bytes_to_unicode()
        self.symbol_bytes = {symbol: byte for byte, symbol in self.byte_symbols.items()}
        self.start_id, self.end_id = self.ids[START], self.ids[END]
        self.pad_id = self.end_id
        self.context_length = context_length
        self.pattern = pre_tokenizer()

    @classmethod
    def from_path(cls, path, context_length=CONTEXT_LENGTH):
        """`path`: bpe_simple_vocab_16e6.txt.gz, or a folder holding vocab.json and merges.txt or tokenizer.json
        (vocab.json and merges.txt when it holds both)."""
        if os.path.isdir(path):
            only_json = not os.path.isfile(os.path.join(path, "vocab.json")) and \
                os.path.isfile(os.path.join(path, "tokenizer.json"))
            merges, vocabulary = (read_tokenizer_json if only_json else read_vocab_and_merges)(path)
            check_vocabulary(vocabulary, merges, os.path.join(path, "tokenizer.json" if only_json else "vocab.json"))
            return cls(merges, vocabulary, context_length)
        if not os.path.isfile(path):
            raise ValueError(f"{path}: no such file or folder; expected bpe_simple_vocab_16e6.txt.gz or a tokenizer "
                             f"folder holding vocab.json and merges.txt, or tokenizer.json")
        if os.path.basename(path) in ("vocab.json", "merges.txt"):
            raise ValueError(f"{path}: give the folder holding vocab.json and merges.txt, not one of the two files")
        return cls(read_merges_gz(path), None, context_length)

    def bpe(self, word):
        """A pre-tokenized word in byte symbols -> its BPE tokens: the last symbol marked with </w>, then the adjacent
        pair of lowest rank merged everywhere (left to right), until no adjacent pair has a rank."""
        symbols = [*word[:-1], word[-1] + END_OF_WORD]
        while len(symbols) > 1:
            pair = min(zip(symbols, symbols[1:]), key=lambda p: self.ranks.get(p, float("inf")))
            if pair not in self.ranks:
                break
            merged, index = [], 0
            while index < len(symbols):
                if index + 1 < len(symbols) and (symbols[index], symbols[index + 1]) == pair:
                    merged.append(symbols[index] + symbols[index + 1])
                    index += 2
                else:
                    merged.append(symbols[index])
                    index += 1
            symbols = merged
        return symbols

    def encode(self, text):
        """One prompt -> its token ids, without start / end tokens. <|startoftext|> / <|endoftext|> written in the text
        are the special tokens, as in CLIP."""
        ids = []
        for word in self.pattern.findall(clean(text)):
            if word in (START, END):
                ids.append(self.ids[word])
                continue
            symbols = "".join(self.byte_symbols[byte] for byte in word.encode("utf-8"))
            ids.extend(self.ids[token] for token in self.bpe(symbols))
        return ids

    def decode(self, ids):
        """Token ids -> text, each </w> read as a space (CLIP's decode)."""
        symbols = "".join(self.tokens[int(index)] for index in ids)
        text = bytes(self.symbol_bytes[symbol] for symbol in symbols).decode("utf-8", errors="replace")
        return text.replace(END_OF_WORD, " ")

    def __call__(self, prompts):
        """prompts (list of str) -> (B, context_length) int64: start, tokens, end, padding with the end token."""
        rows = torch.full((len(prompts), self.context_length), self.pad_id, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids = self.encode(prompt)
            room = self.context_length - 2
            if len(ids) > room:
                warnings.warn(f"prompt {prompt[:40]!r}... has {len(ids)} tokens, {room} fit in {self.context_length} "
                              f"positions; truncated, dropping {self.decode(ids[room:]).strip()!r}")
                ids = ids[:room]
            rows[row, :len(ids) + 2] = torch.tensor([self.start_id, *ids, self.end_id], dtype=torch.long)
        return rows
