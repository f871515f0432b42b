"""Builds small CLIP byte-level BPE vocabularies (vocab.json + merges.txt) for models the project makes.

Real checkpoints ship CLIP's 49,408-token vocabulary; the embedded model and the tests use a small one
with the same rules (byte-level base alphabet, "</w>" word ends, start/end tokens last), so the one
tokenizer in backend/tokenizer.py serves both.
"""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers.models import BPE

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
