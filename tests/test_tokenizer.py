"""backend.tokenizer.CLIPTokenizer against transformers' CLIPTokenizer / CLIPTokenizerFast and a slow reference.

Two tiny byte-level vocabularies are built here: one with the project's word-chain merges
(backend.vocab) and one with merges learned by pair frequency, so BPE merge ranks matter; each is
tried with SD 1.x padding (<|endoftext|>) and SD 2.x padding ("!").
"""
import json
import unicodedata
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import regex

from backend.tokenizer import CLIPTokenizer
from backend.vocab import BOS, EOS, build_vocab, bytes_to_unicode

WORDS = ("a photo of an astronaut riding horse on mars red green blue painting cat dog the "
         "it's don't we're café naïve über 1girl masterpiece best quality").split()

PROMPTS = [
    "", " ", "a photo of a cat", "A PHOTO OF A CAT", "a   photo\tof\n\na  cat  ", "  leading and trailing  ",
    "a cat, a dog; and... a horse!!!", "it's we're they'll I'd you've I'm don't", "(masterpiece:1.2), [best quality]",
    "1girl 2boys 1234567 3.14 1e-5", "café naïve über façade",
    "cafe\u0301 nai\u0308ve",  # NFD -> NFC
    "emoji 🐱🚀 and ✨sparkles✨", "Ελληνικά русский עברית العربية", "日本語のテキスト 中文 한국어",
    "a cat<|endoftext|>a dog", "<|startoftext|>hello", "tabs\tand\u00a0nbsp\u3000ideographic space",
    "mixed CASE and ümlauts ÄÖÜ", "!", "!!! ???", "hello!world", "#hashtag @mention $100 50% a&b",
    "red " * 80, "a photo of an astronaut riding a horse on mars, " * 8,
]


def _train_merges(words, count):
    """A minimal pair-frequency BPE trainer (what CLIP's merges are, in miniature)."""
    b2u = bytes_to_unicode()
    corpus = Counter()
    for word in words:
        chars = [b2u[b] for b in word.lower().encode("utf-8")]
        corpus[tuple(chars[:-1] + [chars[-1] + "</w>"])] += 1
    merges = []
    for _ in range(count):
        pairs = Counter()
        for symbols, n in corpus.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = max(sorted(pairs), key=lambda p: pairs[p])
        merges.append(best)
        merged = Counter()
        for symbols, n in corpus.items():
            out, i = [], 0
            while i < len(symbols):
                if symbols[i:i + 2] == best:
                    out.append(best[0] + best[1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] += n
        corpus = merged
    return merges


def _write_folder(folder: Path, vocab: dict, merges: list, pad: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                       encoding="utf-8")
    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials))
    (folder / "tokenizer_config.json").write_text(json.dumps({**specials, "model_max_length": 77}))
    return folder


def _chain_vocab():
    vocab, merges = build_vocab(WORDS)
    return vocab, [tuple(m.split()) for m in merges]


def _trained_vocab():
    text = " ".join(WORDS * 3 + PROMPTS[2:12])
    words = regex.findall(r"[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+", unicodedata.normalize("NFC", text).lower())
    merges = _train_merges(words, 120)
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges] + [BOS, EOS]
    return {t: i for i, t in enumerate(dict.fromkeys(tokens))}, merges


VOCABS = {"chain": _chain_vocab, "trained": _trained_vocab}
PADS = {"sd1": EOS, "sd2": "!"}


@pytest.fixture(scope="module", params=[(v, p) for v in VOCABS for p in PADS], ids=lambda x: f"{x[0]}-{x[1]}")
def folder(request, tmp_path_factory):
    vocab_name, pad_name = request.param
    vocab, merges = VOCABS[vocab_name]()
    return _write_folder(tmp_path_factory.mktemp(f"tok-{vocab_name}-{pad_name}"), vocab, merges, PADS[pad_name])


class SlowCLIPReference:
    """transformers' slow CLIPTokenizer algorithm (OpenAI's simple_tokenizer), with NFC for ftfy."""

    def __init__(self, folder: Path):
        self.encoder = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        lines = (folder / "merges.txt").read_text(encoding="utf-8").strip().split("\n")[1:]
        self.ranks = {tuple(line.split()): i for i, line in enumerate(lines)}
        config = json.loads((folder / "tokenizer_config.json").read_text())
        self.pad = config["pad_token"]
        self.specials = [BOS, EOS] + ([self.pad] if self.pad not in (BOS, EOS) else [])
        self.byte_encoder = bytes_to_unicode()
        self.pat = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
                                 r"""[^\s\p{L}\p{N}]+""", regex.IGNORECASE)

    def bpe(self, token):
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pairs = set(zip(word, word[1:]))
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            out, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            word = tuple(out)
        return list(word)

    def __call__(self, prompt: str) -> list[int]:
        ids = []
        split = "(" + "|".join(regex.escape(s) for s in self.specials) + ")"
        for chunk in regex.split(split, prompt):
            if chunk in self.specials:
                ids.append(self.encoder[chunk])
                continue
            text = regex.sub(r"\s+", " ", unicodedata.normalize("NFC", chunk)).strip().lower()
            for piece in self.pat.findall(text):
                encoded = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
                ids += [self.encoder.get(t, self.encoder[EOS]) for t in self.bpe(encoded)]
        ids = [self.encoder[BOS]] + ids[:75] + [self.encoder[EOS]]
        return ids + [self.encoder[self.pad]] * (77 - len(ids))


@pytest.mark.parametrize("class_name", ["CLIPTokenizer", "CLIPTokenizerFast"])
def test_matches_transformers(folder, class_name):
    import transformers
    reference = getattr(transformers, class_name).from_pretrained(str(folder))
    ours = CLIPTokenizer.from_folder(folder)
    for prompt in PROMPTS:
        expected = reference(prompt, padding="max_length", max_length=77, truncation=True).input_ids
        assert ours.encode(prompt).ids.tolist() == expected, prompt
    expected = reference(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="np")
    np.testing.assert_array_equal(ours.batch(PROMPTS), expected.input_ids)


def test_matches_slow_reference(folder):
    reference = SlowCLIPReference(folder)
    ours = CLIPTokenizer.from_folder(folder)
    assert len(ours.tokens("a photo of a cat")) < len("aphotoofacat")  # merges are really used
    for prompt in PROMPTS:
        assert ours.encode(prompt).ids.tolist() == reference(prompt), prompt


def test_from_files_and_tokenizer_json_agree(folder, tmp_path):
    import transformers
    ours = CLIPTokenizer.from_folder(folder)
    pad = json.loads((folder / "tokenizer_config.json").read_text())["pad_token"]
    bare = CLIPTokenizer.from_files(folder / "vocab.json", folder / "merges.txt", pad_token=None if pad == EOS else pad)
    transformers.CLIPTokenizer.from_pretrained(str(folder)).save_pretrained(str(tmp_path))
    assert (tmp_path / "tokenizer.json").is_file()
    (tmp_path / "vocab.json").unlink(missing_ok=True)
    saved = CLIPTokenizer.from_folder(tmp_path)
    assert ours.pad_token_id == bare.pad_token_id == saved.pad_token_id
    np.testing.assert_array_equal(ours.batch(PROMPTS), bare.batch(PROMPTS))
    np.testing.assert_array_equal(ours.batch(PROMPTS), saved.batch(PROMPTS))


def test_padding_token_follows_config(tmp_path):
    vocab, merges = _chain_vocab()
    sd1 = CLIPTokenizer.from_folder(_write_folder(tmp_path / "sd1", vocab, merges, EOS))
    sd2 = CLIPTokenizer.from_folder(_write_folder(tmp_path / "sd2", vocab, merges, "!"))
    a, b = sd1.encode("a cat"), sd2.encode("a cat")
    assert a.ids.dtype == np.int32 and a.ids.shape == (77,)
    assert a.length == b.length == 4 and not a.truncated and a.dropped_text == ""
    assert (a.ids[4:] == vocab[EOS]).all() and (b.ids[4:] == vocab["!"]).all()
    np.testing.assert_array_equal(a.ids[:4], b.ids[:4])
    empty = sd1.encode("")
    assert empty.length == 2 and empty.ids[:2].tolist() == [vocab[BOS], vocab[EOS]]


def test_truncation_reports_dropped_text(tmp_path):
    vocab, merges = _chain_vocab()
    tok = CLIPTokenizer.from_folder(_write_folder(tmp_path / "t", vocab, merges, EOS))
    words = [WORDS[i % 8] for i in range(100)]  # each of these is one token
    assert tok.encode(" ".join(words[:75])).truncated is False
    exact = tok.encode(" ".join(words[:75]))
    assert exact.length == 77 and exact.ids[-1] == vocab[EOS]
    long = tok.encode(" ".join(words))
    assert long.truncated and long.length == 77
    assert long.ids[0] == vocab[BOS] and long.ids[76] == vocab[EOS]
    np.testing.assert_array_equal(long.ids[:76], exact.ids[:76])
    assert long.dropped_text == " ".join(words[75:])
    one_over = tok.encode(" ".join(words[:76]) + "  ")
    assert one_over.truncated and one_over.dropped_text == words[75]


def test_chain_vocab_makes_every_word_one_token(tmp_path):
    """Also where an earlier word's merge outranks a later word's own ("right" merges "r i" before "triangle"'s "t r")."""
    import transformers
    words = WORDS + ["right", "triangle", "tri", "riding", "ridge"]
    vocab, merges = build_vocab(words)
    words = [w for w in words if w.isalpha()]  # CLIP's pre-tokenizer splits "it's" and "1girl" before BPE
    folder = _write_folder(tmp_path / "t", vocab, [tuple(m.split()) for m in merges], EOS)
    ours, reference = CLIPTokenizer.from_folder(folder), transformers.CLIPTokenizer.from_pretrained(str(folder))
    for word in words:
        assert len(ours.tokens(word)) == 1, (word, ours.tokens(word))
        assert reference(word).input_ids == ours.encode(word).ids[:3].tolist(), word


def test_missing_special_token_is_refused(tmp_path):
    vocab, merges = _chain_vocab()
    with pytest.raises(ValueError, match="pad token"):
        CLIPTokenizer(vocab, merges, pad_token="<pad>")
