"""CLIP's prompt tokenizer: text -> fixed-length token ids, with the rules of transformers' CLIPTokenizer.

Built on the `tokenizers` library (no transformers at run time) from a checkpoint's tokenizer folder:
vocab.json + merges.txt (the diffusers layout and Apple's Core ML folders) or a tokenizer.json (what
transformers 5 saves), plus tokenizer_config.json / special_tokens_map.json when present.

The rules, as transformers applies them: NFC, runs of whitespace -> one space, lower case, CLIP's split
regex, byte-level BPE with a "</w>" end-of-word suffix; <|startoftext|> ... <|endoftext|> around the text,
truncated to `model_max_length` (77) and padded with the checkpoint's pad token (SD 1.x: <|endoftext|>,
SD 2.x: "!"). Special tokens typed in the prompt (including the pad token) are matched before
normalization and become their ids, as in transformers.

`T5Tokenizer` does the same for SD3's T5 encoder (tokenizer_3): SentencePiece Unigram from a tokenizer.json,
"</s>" appended, padded with "<pad>" to diffusers' 256 tokens (see its docstring).
"""
from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE, Unigram

from backend import files
from backend.types import UserError

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
DEFAULT_MAX_LENGTH = 77
# CLIP's vocabulary is 256 bytes x2 + 48,894 merges + 2 specials; the reference tokenizer reads no more merges.
MAX_MERGES = 49152 - 256 - 2
CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


@dataclass(frozen=True)
class Tokenized:
    ids: np.ndarray      # int32 (max_length,): bos, tokens, eos, then pad tokens
    length: int          # tokens in `ids` before the padding, bos and eos included
    truncated: bool      # the prompt had more tokens than fit
    dropped_text: str    # the part of the prompt that did not fit ("" when nothing was dropped)


def _token_text(value) -> str | None:
    """A special token as tokenizer configs store it: a string or {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _read_json(path: Path, required: bool = False) -> dict:
    """A tokenizer file (bounded read, backend/files.py); an optional one that is absent is {}."""
    if not required and not path.exists():
        return {}
    return files.read_json(path, files.TOKENIZER_BYTES)


def _read_lines(path: Path) -> list:
    return files.read_text(path, files.TOKENIZER_BYTES).splitlines()


def _read_merges(lines: list) -> list[tuple[str, str]]:
    merges = []
    for i, line in enumerate(lines):
        if isinstance(line, (list, tuple)):  # tokenizer.json may store merges as pairs
            merges.append((line[0], line[1]))
            continue
        if i == 0 and line.startswith("#version"):
            continue
        parts = line.split()
        if len(parts) == 2:
            merges.append((parts[0], parts[1]))
    return merges[:MAX_MERGES]


class _Rows:
    """What both tokenizers share: rows of ids for several prompts at once."""

    def batch(self, prompts) -> np.ndarray:
        """(B, max_length) int32 ids for a prompt or a list of prompts."""
        if isinstance(prompts, str):
            prompts = [prompts]
        return np.stack([self.encode(p).ids for p in prompts])

    def __call__(self, prompts) -> np.ndarray:
        return self.batch(prompts)


class CLIPTokenizer(_Rows):
    """Turns prompts into the (77,) int32 id rows a CLIP text encoder takes."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], *, pad_token: str | None = None,
                 max_length: int = DEFAULT_MAX_LENGTH, bos_token: str = BOS_TOKEN, eos_token: str = EOS_TOKEN,
                 unk_token: str | None = None):
        pad_token = pad_token or eos_token
        unk_token = unk_token or eos_token
        for name, token in (("bos", bos_token), ("eos", eos_token), ("pad", pad_token), ("unk", unk_token)):
            if token not in vocab:
                raise ValueError(f"the tokenizer's {name} token {token!r} is not in its vocabulary")
        self.max_length = int(max_length)
        self.bos_token_id = vocab[bos_token]
        self.eos_token_id = vocab[eos_token]
        self.pad_token_id = vocab[pad_token]
        self.pad_token = pad_token
        self.vocab_size = len(vocab)
        self._tokenizer = self._build(vocab, merges, unk_token)
        specials = dict.fromkeys([bos_token, eos_token, unk_token, pad_token])
        self._tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])

    @staticmethod
    def _build(vocab: dict[str, int], merges: list[tuple[str, str]], unk_token: str) -> Tokenizer:
        model = BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                    end_of_word_suffix="</w>", fuse_unk=False, unk_token=unk_token)
        tokenizer = Tokenizer(model)
        tokenizer.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ])
        return tokenizer

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_files(cls, vocab_path, merges_path, pad_token: str | None = None,
                   max_length: int = DEFAULT_MAX_LENGTH) -> "CLIPTokenizer":
        """From a bare vocab.json + merges.txt (Core ML folders); `pad_token` None pads with <|endoftext|>."""
        vocab = _read_json(Path(vocab_path), required=True)
        if not vocab or not isinstance(vocab, dict):
            raise UserError(f"{Path(vocab_path).name} holds no vocabulary")
        merges = _read_merges(_read_lines(Path(merges_path)))
        return cls(vocab, merges, pad_token=pad_token, max_length=max_length)

    @classmethod
    def from_folder(cls, folder) -> "CLIPTokenizer":
        """From a checkpoint's tokenizer folder (vocab.json + merges.txt, or tokenizer.json)."""
        folder = Path(folder)
        settings = {**_read_json(folder / "special_tokens_map.json"), **_read_json(folder / "tokenizer_config.json")}
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            vocab = _read_json(folder / "vocab.json", required=True)
            merges = _read_merges(_read_lines(folder / "merges.txt"))
        elif (folder / "tokenizer.json").is_file():
            model = _read_json(folder / "tokenizer.json", required=True).get("model", {})
            if model.get("type") != "BPE":
                raise UserError(f"{folder.name}/tokenizer.json is not a BPE tokenizer")
            vocab, merges = model["vocab"], _read_merges(model.get("merges", []))
        else:
            present = [n for n in ("vocab.json", "merges.txt") if (folder / n).is_file()]
            missing = [n for n in ("vocab.json", "merges.txt") if n not in present]
            raise UserError(f"the tokenizer in {folder} is incomplete: {' and '.join(missing)} missing "
                            "(it needs vocab.json + merges.txt, or a tokenizer.json)")
        max_length = settings.get("model_max_length") or DEFAULT_MAX_LENGTH
        if not isinstance(max_length, int) or max_length > 10_000:  # transformers' "no limit" sentinel
            max_length = DEFAULT_MAX_LENGTH
        return cls(vocab, merges, max_length=max_length,
                   pad_token=_token_text(settings.get("pad_token")),
                   bos_token=_token_text(settings.get("bos_token")) or BOS_TOKEN,
                   eos_token=_token_text(settings.get("eos_token")) or EOS_TOKEN,
                   unk_token=_token_text(settings.get("unk_token")))

    # ------------------------------------------------------------------ encoding

    def tokens(self, text: str) -> list[str]:
        """The BPE tokens of `text`, without bos/eos (for inspection and tests)."""
        return self._tokenizer.encode(text, add_special_tokens=False).tokens

    def encode(self, prompt: str) -> Tokenized:
        """bos + tokens + eos, truncated to `max_length` (bos + max_length-2 tokens + eos), then padded."""
        encoding = self._tokenizer.encode(prompt, add_special_tokens=False)
        room = self.max_length - 2
        body = encoding.ids[:room]
        truncated = len(encoding.ids) > room
        dropped_text = prompt[encoding.offsets[room][0]:].strip() if truncated else ""
        ids = np.full(self.max_length, self.pad_token_id, dtype=np.int32)
        ids[0] = self.bos_token_id
        ids[1:1 + len(body)] = body
        ids[1 + len(body)] = self.eos_token_id
        return Tokenized(ids=ids, length=len(body) + 2, truncated=truncated, dropped_text=dropped_text)


# ----------------------------------------------------------------------------------------------
# T5 (SD3's tokenizer_3)
# ----------------------------------------------------------------------------------------------

T5_DEFAULT_MAX_LENGTH = 256  # diffusers' StableDiffusion3Pipeline max_sequence_length default
SPIECE_UNDERLINE = "\u2581"


def _precompiled_charsmap(normalizer: dict | None) -> bytes | None:
    """The SentencePiece charsmap of a tokenizer.json normalizer (alone or inside a Sequence), if any."""
    if not normalizer:
        return None
    parts = normalizer.get("normalizers", []) if normalizer.get("type") == "Sequence" else [normalizer]
    for part in parts:
        if part.get("type") == "Precompiled" and part.get("precompiled_charsmap"):
            return base64.b64decode(part["precompiled_charsmap"])
    return None


class T5Tokenizer(_Rows):
    """Turns prompts into the (max_length,) int32 id rows a T5 encoder takes, as transformers' T5TokenizerFast
    does with diffusers' SD3 call (padding="max_length", truncation=True, add_special_tokens=True).

    The pipeline is transformers 5's T5Tokenizer, which rebuilds it from tokenizer.json rather than taking
    the file's as is: SentencePiece Unigram over the file's pieces and scores (no byte fallback); the file's
    Precompiled charsmap as the normalizer (SentencePiece's nmt_nfkc), any other normalizer ignored;
    whitespace split, then "▁" for each space and before each word (Metaspace, prepend "always"); tokens,
    then "</s>", truncated to `max_length` (the "</s>" kept), padded with "<pad>" (id 0 in T5). Special
    tokens typed in the prompt ("</s>", "<extra_id_0>", ...) are matched before normalization and become
    their ids. Real T5 files (t5-v1_1, SD3's tokenizer_3) use exactly this pipeline in their tokenizer.json.
    """

    def __init__(self, vocab: list[tuple[str, float]], *, unk_id: int | None = None,
                 precompiled_charsmap: bytes | None = None, eos_token: str = "</s>", pad_token: str = "<pad>",
                 unk_token: str = "<unk>", special_tokens=(), max_length: int = T5_DEFAULT_MAX_LENGTH):
        pieces = {piece: i for i, (piece, _) in enumerate(vocab)}
        for name, token in (("eos", eos_token), ("pad", pad_token), ("unk", unk_token)):
            if token not in pieces:
                raise ValueError(f"the tokenizer's {name} token {token!r} is not in its vocabulary")
        self.max_length = int(max_length)
        self.eos_token_id = pieces[eos_token]
        self.pad_token_id = pieces[pad_token]
        self.unk_token_id = pieces[unk_token] if unk_id is None else int(unk_id)
        self.pad_token = pad_token
        tokenizer = Tokenizer(Unigram([(piece, float(score)) for piece, score in vocab], self.unk_token_id,
                                      byte_fallback=False))
        if precompiled_charsmap:
            tokenizer.normalizer = normalizers.Precompiled(precompiled_charsmap)
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement=SPIECE_UNDERLINE, prepend_scheme="always", split=True),
        ])
        specials = dict.fromkeys([pad_token, eos_token, unk_token, *special_tokens])
        tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
        self._tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_folder(cls, folder, max_length: int = T5_DEFAULT_MAX_LENGTH) -> "T5Tokenizer":
        """From a checkpoint's T5 tokenizer folder (tokenizer.json, + tokenizer_config.json /
        special_tokens_map.json when present). `max_length` is the sequence length the encoder gets
        (diffusers' max_sequence_length), not the config's model_max_length."""
        folder = Path(folder)
        if not (folder / "tokenizer.json").is_file():
            raise UserError(f"{folder} has no tokenizer.json (a T5 tokenizer needs it; spiece.model is not read)")
        data = _read_json(folder / "tokenizer.json", required=True)
        model = data.get("model", {})
        if model.get("type") != "Unigram" or not isinstance(model.get("vocab"), list):
            raise UserError(f"{folder}/tokenizer.json is not a SentencePiece Unigram tokenizer (type "
                             f"{model.get('type')!r}); T5 tokenizers are")
        settings = {**_read_json(folder / "special_tokens_map.json"), **_read_json(folder / "tokenizer_config.json")}
        specials = [t["content"] for t in data.get("added_tokens", []) if t.get("special", True)]
        extra = settings.get("additional_special_tokens") or settings.get("extra_special_tokens") or []
        specials += [_token_text(t) for t in (extra.values() if isinstance(extra, dict) else extra)]
        specials += [_token_text(t) for t in settings.get("added_tokens_decoder", {}).values()
                     if not isinstance(t, dict) or t.get("special", True)]
        return cls([(piece, score) for piece, score in model["vocab"]], unk_id=model.get("unk_id"),
                   precompiled_charsmap=_precompiled_charsmap(data.get("normalizer")),
                   eos_token=_token_text(settings.get("eos_token")) or "</s>",
                   pad_token=_token_text(settings.get("pad_token")) or "<pad>",
                   unk_token=_token_text(settings.get("unk_token")) or "<unk>",
                   special_tokens=[t for t in specials if t], max_length=max_length)

    # ------------------------------------------------------------------ encoding

    def tokens(self, text: str) -> list[str]:
        """The pieces of `text`, without "</s>" (for inspection and tests)."""
        return self._tokenizer.encode(text, add_special_tokens=False).tokens

    def encode(self, prompt: str, max_length: int | None = None) -> Tokenized:
        """tokens + "</s>", truncated to `max_length` (max_length-1 tokens + "</s>"), then padded.
        `max_length` None: the tokenizer's own."""
        length = self.max_length if max_length is None else int(max_length)
        if length < 1:
            raise ValueError(f"max_length must be at least 1, not {length}")
        encoding = self._tokenizer.encode(prompt, add_special_tokens=False)
        room = length - 1
        body = encoding.ids[:room]
        truncated = len(encoding.ids) > room
        dropped_text = prompt[encoding.offsets[room][0]:].strip() if truncated else ""
        ids = np.full(length, self.pad_token_id, dtype=np.int32)
        ids[:len(body)] = body
        ids[len(body)] = self.eos_token_id
        return Tokenized(ids=ids, length=len(body) + 1, truncated=truncated, dropped_text=dropped_text)
