"""Builds small CLIP byte-level BPE vocabularies (vocab.json + merges.txt) for models the project makes,
and small T5 SentencePiece tokenizer folders (`write_t5_tokenizer_folder`) for the SD3 tests.

Real checkpoints ship CLIP's 49,408-token vocabulary; the embedded model and the tests use a small one
with the same rules (byte-level base alphabet, "</w>" word ends, start/end tokens last), so the one
tokenizer in backend/tokenizer.py serves both.
"""
from __future__ import annotations

import json
import struct
import unicodedata
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE, Unigram

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _pieces(word: str, tokens: list[str], merges: list[tuple[str, str]]) -> list[str]:
    """`word` (byte-encoded) as BPE splits it with these merges: the model CLIPTokenizer runs."""
    model = BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, continuing_subword_prefix="",
                end_of_word_suffix="</w>")
    return [token.value for token in model.tokenize(word)]


def build_vocab(words: list[str]) -> tuple[dict[str, int], list[str]]:
    """A vocabulary where each of `words` becomes one token, plus every single byte (with and without "</w>").

    Each word gets a left-to-right chain of merges ((a b) c) d</w>, appended after all earlier ones. A pair
    that an earlier word already merged can take precedence inside a later word ("right" makes "r i", so
    "triangle" would stop at "t ri ..."), so each word is run through BPE and, where it is still in pieces,
    chained again from those pieces, until every word is one token.
    """
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet]
    merges: list[tuple[str, str]] = []
    known = set(tokens)
    for word in words:
        encoded = "".join(bytes_to_unicode()[b] for b in word.lower().encode("utf-8"))
        while len(pieces := _pieces(encoded, tokens, merges)) > 1:
            current = pieces[0]
            for nxt in pieces[1:]:
                merged = current + nxt
                if merged not in known:
                    merges.append((current, nxt))
                    tokens.append(merged)
                    known.add(merged)
                current = merged
    tokens += [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, [f"{a} {b}" for a, b in merges]


def write_tokenizer_folder(folder: Path, words: list[str], pad_token: str = EOS, max_length: int = 77) -> Path:
    """Write vocab.json, merges.txt and the configs transformers' CLIPTokenizer reads."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab(words)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "bos_token": BOS,
        "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token, "do_lower_case": True,
        "errors": "replace", "add_prefix_space": False}))
    return folder


# ----------------------------------------------------------------------------------------------
# T5 (SentencePiece Unigram) tokenizer folders, for SD3's tokenizer_3 in tests
# ----------------------------------------------------------------------------------------------
#
# What a real T5 tokenizer.json holds (google-t5/t5-small, google/t5-v1_1-xxl, SD3's tokenizer_3): the layout
# transformers' T5Converter writes (transformers/convert_slow_tokenizer.py: SpmConverter + T5Converter) and its
# T5Tokenizer reads back (transformers/models/t5/tokenization_t5.py); the real files themselves were not
# reachable here (no network), so this follows those two sources:
#   model          {"type": "Unigram", "unk_id": 2, "vocab": [["<pad>", 0.0], ["</s>", 0.0], ["<unk>", 0.0],
#                   ["▁", -2.0...], ...pieces with log-probability scores...,
#                   ["<extra_id_99>", 0.0] ... ["<extra_id_0>", 0.0]]}
#   normalizer     {"type": "Precompiled", "precompiled_charsmap": base64}: SentencePiece's nmt_nfkc rules,
#                   a darts-clone double-array trie compiled by SentencePiece
#   pre_tokenizer  Sequence[WhitespaceSplit, Metaspace("▁", prepend "always" / legacy add_prefix_space true)]
#   post_processor TemplateProcessing: single "$A </s>", pair "$A </s> $B </s>"
#   decoder        Metaspace
#   added_tokens   <pad>, </s>, <unk> and the 100 <extra_id_N> sentinels, special, not normalized
# tokenizer_config.json: T5Tokenizer, eos "</s>", unk "<unk>", pad "<pad>", extra_ids 100 with the sentinels as
# additional_special_tokens, model_max_length 512.
# transformers 5's T5Tokenizer rebuilds its pipeline from this file and keeps the normalizer only when it is
# a Precompiled charsmap (a plain NFKC normalizer would be dropped), so the folder written here carries a
# real Precompiled charsmap: SentencePiece's nmt_nfkc rules (sentencepiece/src/builder.cc: BuildNFKCMap,
# BuildNmtNFKCMap; normalizer.cc: the blob layout) over the code points a test prompt uses, compiled into
# the same double array, which the tokenizers library's Precompiled normalizer reads.

T5_PAD, T5_EOS, T5_UNK = "<pad>", "</s>", "<unk>"
T5_EXTRA_IDS = 100
SPIECE_UNDERLINE = "\u2581"
# Code points where a subset of nmt_nfkc is compiled: Latin-1 and Latin Extended-A/B, general punctuation,
# super/subscripts, letterlike and number forms, enclosed alphanumerics, CJK symbols, ligatures, full/halfwidth forms.
_CHARSMAP_RANGES = ((0x80, 0x250), (0x2000, 0x2070), (0x2070, 0x20A0), (0x2100, 0x2190), (0x2460, 0x2500),
                    (0x3000, 0x3040), (0xFB00, 0xFB07), (0xFF01, 0xFFEF))
# BuildNmtNFKCMap: "other code points considered as whitespace", and the fullwidth tilde left alone.
_NMT_SPACES = (0x9, 0xA, 0xC, 0xD, 0x1680, 0x200B, 0x200E, 0x200F, 0x2028, 0x2029, 0x2581, 0xFEFF, 0xFFFD)
_NMT_KEEP = (0xFF5E,)


def nmt_nfkc_rules(ranges=_CHARSMAP_RANGES) -> dict[str, str]:
    """SentencePiece's nmt_nfkc rules over `ranges`: single characters whose NFKC differs, the NFKD
    sequences of those characters that NFC composes (so decomposed input is composed too), and NMT's
    whitespace rules. The real charsmap has the same rules over all of Unicode."""
    rules: dict[str, str] = {}
    for start, stop in ranges:
        for cp in range(start, stop):
            char = chr(cp)
            if unicodedata.category(char) == "Cn":
                continue
            nfkc = unicodedata.normalize("NFKC", char)
            if nfkc != char:
                rules[char] = nfkc
            nfkd = unicodedata.normalize("NFKD", char)
            if len(nfkd) > 1 and unicodedata.normalize("NFC", nfkd) != nfkd:
                rules.setdefault(nfkd, unicodedata.normalize("NFC", nfkd))
    for cp in _NMT_SPACES:
        rules[chr(cp)] = " "
    for cp in _NMT_KEEP:
        rules.pop(chr(cp), None)
    return {key: value for key, value in rules.items() if key != value and value}


def _double_array(values: dict[bytes, int]) -> list[int]:
    """A darts-clone double array (the trie SentencePiece compiles a charsmap into) of byte keys -> values.

    Unit layout (darts.h): bits 0-7 the label, bit 8 "has a leaf", bits 10-30 the offset to the children's
    base; a child with label c lives at base ^ c, a node's value at base ^ 0 with bit 31 set. Searches read
    only units at base ^ byte, so the array is padded to whole 256-unit blocks.
    """
    trie: dict = {}
    for key, value in values.items():
        node = trie
        for byte in key:
            node = node.setdefault(byte, {})
        node[None] = value
    units: dict[int, int] = {}
    used = {0}
    queue = [(trie, 0, 0)]
    while queue:
        node, position, label = queue.pop(0)
        labels = sorted(b for b in node if b is not None)
        slots = ([0] if None in node else []) + labels
        base = 1
        while any((base ^ c) in used for c in slots):
            base += 1
        offset = base ^ position
        if offset >= 1 << 21:
            raise ValueError("charsmap too large for the short offset form")
        units[position] = (offset << 10) | ((None in node) << 8) | label
        used.update(base ^ c for c in slots)
        if None in node:
            units[base] = (1 << 31) | node[None]
        queue += [(node[c], base ^ c, c) for c in labels]
    size = (max(used) // 256 + 1) * 256
    return [units.get(i, 0) for i in range(size)]


def precompiled_charsmap(rules: dict[str, str]) -> bytes:
    """SentencePiece's precompiled charsmap blob (normalizer.cc EncodePrecompiledCharsMap): u32 trie size
    in bytes, the double array, then the NUL-terminated replacement strings the trie values point into."""
    positions: dict[str, int] = {}
    normalized = b""
    for target in sorted(set(rules.values())):
        positions[target] = len(normalized)
        normalized += target.encode("utf-8") + b"\0"
    units = _double_array({key.encode("utf-8"): positions[value] for key, value in rules.items()})
    trie = struct.pack(f"<{len(units)}I", *units)
    return struct.pack("<I", len(trie)) + trie + normalized


T5_CHARACTERS = ("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                 "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"
                 "àáâäãåçèéêëìíîïñòóôöõøùúûüýÿßæœÀÁÂÄÇÈÉÊËÎÏÑÓÔÖØÙÚÛÜ°·–—‘’“”€£¥")
T5_SUFFIXES = ("s", "es", "ed", "ing", "er", "ly")


def build_t5_vocab(words: list[str], extra_ids: int = T5_EXTRA_IDS) -> list[tuple[str, float]]:
    """A T5-style Unigram vocabulary: <pad>, </s>, <unk>, "▁", "▁word" for each word (T5 is cased, so as
    given), a few suffixes, every character of T5_CHARACTERS, then the <extra_id_N> sentinels in reverse.
    Whole words score higher than their spellings, so each word is one piece; any text in the alphabet
    tokenizes, and characters outside it become <unk> (as many are for the real T5)."""
    pieces = [(T5_PAD, 0.0), (T5_EOS, 0.0), (T5_UNK, 0.0), (SPIECE_UNDERLINE, -2.0)]
    seen = {piece for piece, _ in pieces}
    entries = [SPIECE_UNDERLINE + w for w in words] + list(T5_SUFFIXES) + list(T5_CHARACTERS)
    for i, piece in enumerate(dict.fromkeys(entries)):
        if piece in seen:
            continue
        base = -10.0 if len(piece) == 1 else -5.0
        pieces.append((piece, base - 0.001 * i))
        seen.add(piece)
    pieces += [(f"<extra_id_{i}>", 0.0) for i in range(extra_ids - 1, -1, -1)]
    return pieces


def write_t5_tokenizer_folder(folder: Path, words: list[str], max_length: int = 512,
                              extra_ids: int = T5_EXTRA_IDS) -> Path:
    """Write a T5 tokenizer folder (tokenizer.json, tokenizer_config.json, special_tokens_map.json) laid out as
    the real ones are (see the comment above), small enough for tests; transformers' T5TokenizerFast loads it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = build_t5_vocab(words, extra_ids)
    tokenizer = Tokenizer(Unigram(vocab, unk_id=2, byte_fallback=False))
    tokenizer.normalizer = normalizers.Precompiled(precompiled_charsmap(nmt_nfkc_rules()))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement=SPIECE_UNDERLINE, prepend_scheme="always", split=True)])
    tokenizer.decoder = decoders.Metaspace(replacement=SPIECE_UNDERLINE, prepend_scheme="always", split=True)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=["$A", T5_EOS], pair=["$A", T5_EOS, "$B", T5_EOS], special_tokens=[(T5_EOS, 1)])
    sentinels = [f"<extra_id_{i}>" for i in range(extra_ids)]
    specials = [T5_PAD, T5_EOS, T5_UNK] + sentinels[::-1]
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    tokenizer.save(str(folder / "tokenizer.json"))
    special_map = {"eos_token": T5_EOS, "unk_token": T5_UNK, "pad_token": T5_PAD,
                   "additional_special_tokens": sentinels}
    (folder / "special_tokens_map.json").write_text(json.dumps(special_map))
    added = {str(tokenizer.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                             "single_word": False, "special": True} for t in specials}
    (folder / "tokenizer_config.json").write_text(json.dumps({
        **special_map, "tokenizer_class": "T5Tokenizer", "extra_ids": extra_ids, "model_max_length": max_length,
        "legacy": True, "clean_up_tokenization_spaces": True, "added_tokens_decoder": added}, indent=1))
    return folder
