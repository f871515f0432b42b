"""backend.engines.mlx.t5 and backend.tokenizer.T5Tokenizer against transformers' T5EncoderModel / T5TokenizerFast.

A tiny random-weight T5 (tests/tiny_t5.py) is saved with save_pretrained (safetensors), loaded into MLX
through backend.engines.mlx.weights, and fed token ids the way diffusers' SD3 pipeline makes them
(tokenizer_3, padding to 256, no attention mask); the tokenizer folder is backend.vocab's small T5 one,
loaded by both tokenizers.
"""
import json

import mlx.core as mx
import numpy as np
import pytest
import torch

from backend.engines.mlx import weights as weight_io
from backend.engines.mlx.t5 import (T5Config, T5EncoderModel, checkpoint_names, load_t5_encoder,
                                    relative_position_buckets)
from backend.tokenizer import T5Tokenizer
from tests.tiny_t5 import tiny_t5

PROMPTS = [
    "", " ", "a photo of a cat", "A PHOTO OF A CAT", "A Photo of an Astronaut riding a horse on Mars",
    "a   photo\tof\n\na  cat  ", "  leading and trailing  ", "a cat, a dog; and... a horse!!!",
    "(masterpiece:1.2), [best quality]", "1girl 2boys 1234567 3.14 1e-5",
    "café naïve über façade Ærøskøbing", "cafe\u0301 nai\u0308ve",  # decomposed: the charsmap composes them
    "ﬁne ｆｕｌｌｗｉｄｔｈ Ｔｅｘｔ ½ ① x² ™ …",  # NFKC
    "no\u00a0break\u3000ideographic\u200bzero-width \u2581underline",  # nmt_nfkc whitespace
    "emoji 🐱🚀 and ✨sparkles✨", "Ελληνικά русский 日本語のテキスト",  # <unk>
    "a cat</s>a dog <extra_id_0> <pad> <unk>",  # special tokens typed in the prompt
    "cats dogs painted riding quickly",
    "red " * 300,  # over-long: truncated, "</s>" kept
    "a photo of an astronaut riding a horse on mars, " * 30,
]


def _relative_error(actual, expected) -> float:
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    return float(np.abs(actual - expected).max() / (np.abs(expected).max() + 1e-12))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(folder with tokenizer_3/ and text_encoder_3/, torch model, transformers tokenizer)."""
    folder = tmp_path_factory.mktemp("t5")
    model, tokenizer = tiny_t5(folder / "tokenizer_3")
    model.save_pretrained(str(folder / "text_encoder_3"), safe_serialization=True)
    return folder, model, tokenizer


def _reference_ids(tokenizer, prompts, max_length=256) -> np.ndarray:
    """The ids diffusers' StableDiffusion3Pipeline._get_t5_prompt_embeds gives text_encoder_3."""
    return tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                     add_special_tokens=True, return_tensors="np").input_ids


# ---------------------------------------------------------------------------------------------- tokenizer

@pytest.mark.parametrize("max_length", [256, 77])
def test_tokenizer_matches_transformers(tiny, max_length):
    folder, _, reference = tiny
    ours = T5Tokenizer.from_folder(folder / "tokenizer_3", max_length=max_length)
    assert len(ours) == len(reference)
    assert (ours.eos_token_id, ours.pad_token_id, ours.unk_token_id) == (1, 0, 2)
    for prompt in PROMPTS:
        expected = reference(prompt, padding="max_length", max_length=max_length, truncation=True).input_ids
        assert ours.encode(prompt).ids.tolist() == expected, prompt
    np.testing.assert_array_equal(ours.batch(PROMPTS), _reference_ids(reference, PROMPTS, max_length))


def test_tokenizer_normalizes_and_keeps_case(tiny):
    folder, _, reference = tiny
    ours = T5Tokenizer.from_folder(folder / "tokenizer_3")
    assert ours.tokens("a photo") == ["▁a", "▁photo"]
    assert ours.tokens("A Photo") == ["▁A", "▁Photo"] != ours.tokens("a photo")  # T5 is cased
    assert ours.tokens("ﬁne") == ours.tokens("fine")  # NFKC from the Precompiled charsmap
    assert ours.tokens("ｃａｔ") == ours.tokens("cat") == ["▁cat"]
    assert ours.tokens("cafe\u0301") == ours.tokens("café")
    assert ours.tokens("a\u00a0cat\u3000dog") == ["▁a", "▁cat", "▁dog"]
    assert ours.tokens("a  \t cat") == ours.tokens("a cat")
    assert ours.encode("日本").ids[:3].tolist() == reference("日本").input_ids == [3, 2, 1]  # ▁ <unk> </s>


def test_tokenizer_truncation_keeps_eos(tiny):
    folder, _, _ = tiny
    ours = T5Tokenizer.from_folder(folder / "tokenizer_3")
    words = ["red", "green", "blue", "cat"] * 80  # one piece each
    exact = ours.encode(" ".join(words[:255]))
    assert exact.length == 256 and not exact.truncated and exact.dropped_text == ""
    assert exact.ids[-1] == ours.eos_token_id
    long = ours.encode(" ".join(words))
    assert long.truncated and long.length == 256 and long.ids[255] == ours.eos_token_id
    np.testing.assert_array_equal(long.ids, exact.ids)
    assert long.dropped_text == " ".join(words[255:])
    short = ours.encode("a cat")
    assert short.length == 3 and short.ids[2] == ours.eos_token_id
    assert (short.ids[3:] == 0).all() and short.ids.dtype == np.int32 and short.ids.shape == (256,)
    ours.max_length = 8
    assert ours.encode("a photo of a red cat on mars").ids.tolist()[-1] == ours.eos_token_id
    assert ours.encode("a photo of a red cat on mars").dropped_text == "mars"


def test_tokenizer_reads_charsmap_inside_sequence(tmp_path, tiny):
    """A normalizer Sequence[Precompiled, Replace]: the charsmap is used, the rest ignored, as transformers 5 does."""
    import transformers
    folder, _, _ = tiny
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        (tmp_path / name).write_text((folder / "tokenizer_3" / name).read_text())
    data = json.loads((folder / "tokenizer_3" / "tokenizer.json").read_text())
    data["normalizer"] = {"type": "Sequence", "normalizers": [
        data["normalizer"], {"type": "Replace", "pattern": {"String": "cat"}, "content": "dog"}]}
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    ours = T5Tokenizer.from_folder(tmp_path)
    assert ours.tokens("ﬁne cat") == ["▁", "f", "i", "n", "e", "▁cat"]
    np.testing.assert_array_equal(
        ours.batch(PROMPTS), _reference_ids(transformers.T5TokenizerFast.from_pretrained(str(tmp_path)), PROMPTS))


def test_tokenizer_refuses_other_files(tmp_path, tiny):
    folder, _, _ = tiny
    with pytest.raises(ValueError, match="tokenizer.json"):
        T5Tokenizer.from_folder(tmp_path)
    data = json.loads((folder / "tokenizer_3" / "tokenizer.json").read_text())
    data["model"] = {"type": "BPE", "vocab": {}, "merges": []}
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="Unigram"):
        T5Tokenizer.from_folder(tmp_path)
    with pytest.raises(ValueError, match="eos token"):
        T5Tokenizer([("<pad>", 0.0), ("<unk>", 0.0)])


# ---------------------------------------------------------------------------------------------- encoder

def test_config_from_dict(tiny):
    folder, model, _ = tiny
    raw = json.loads((folder / "text_encoder_3" / "config.json").read_text())
    config = T5Config.from_dict(raw)
    assert (config.d_model, config.d_kv, config.d_ff, config.num_layers, config.num_heads) == (32, 8, 37, 2, 4)
    assert (config.relative_attention_num_buckets, config.relative_attention_max_distance) == (8, 16)
    assert config.vocab_size == model.config.vocab_size and config.is_gated_act and config.dense_act_fn == "gelu_new"
    assert not T5Config.from_dict({**raw, "feed_forward_proj": "relu"}).is_gated_act
    with pytest.raises(ValueError, match="feed_forward_proj"):
        T5Config.from_dict({**raw, "feed_forward_proj": "gated-silu"})
    with pytest.raises(ValueError, match="umt5"):
        T5Config.from_dict({**raw, "model_type": "umt5"})
    with pytest.raises(ValueError, match="decoder"):
        T5Config.from_dict({**raw, "is_decoder": True})


@pytest.mark.parametrize("buckets,distance", [(8, 16), (32, 128)])
@pytest.mark.parametrize("length", [1, 77, 256, 600])
def test_relative_position_buckets_match_transformers(buckets, distance, length):
    from transformers.models.t5.modeling_t5 import T5Attention
    relative = torch.arange(length)[None, :] - torch.arange(length)[:, None]
    expected = T5Attention._relative_position_bucket(relative, bidirectional=True, num_buckets=buckets,
                                                     max_distance=distance)
    np.testing.assert_array_equal(relative_position_buckets(length, length, buckets, distance), expected.numpy())


def test_matches_transformers_fp32(tiny):
    folder, model, tokenizer = tiny
    ours = load_t5_encoder(folder / "text_encoder_3")
    for prompts, length in ((PROMPTS[2:6], 256), (PROMPTS[-3:], 77), (PROMPTS[4:5], 9)):
        ids = _reference_ids(tokenizer, prompts, length)
        with torch.no_grad():
            expected = model(torch.from_numpy(ids)).last_hidden_state  # no attention mask, as diffusers
        out = ours(mx.array(ids)).last_hidden_state
        assert out.shape == (len(prompts), length, 32) and out.dtype == mx.float32
        assert _relative_error(out, expected) <= 1e-5, length
    single = ours(mx.array(ids[0])).last_hidden_state  # a 1-D row is one batch row
    assert _relative_error(single, expected[:1]) <= 1e-5


def test_relu_feed_forward_matches_transformers(tmp_path):
    model, tokenizer = tiny_t5(tmp_path / "tokenizer", feed_forward_proj="relu", seed=5)
    model.save_pretrained(str(tmp_path / "encoder"), safe_serialization=True)
    ids = _reference_ids(tokenizer, PROMPTS[2:4], 64)
    with torch.no_grad():
        expected = model(torch.from_numpy(ids)).last_hidden_state
    ours = load_t5_encoder(tmp_path / "encoder")
    assert "wi" in ours.encoder.block[0].layer[1].DenseReluDense
    assert _relative_error(ours(mx.array(ids)).last_hidden_state, expected) <= 1e-5


def test_padding_is_attended_like_diffusers(tiny):
    """No mask: the pad tokens change the real tokens' states (diffusers' SD3 call), bidirectionally."""
    folder, model, tokenizer = tiny
    ours = load_t5_encoder(folder / "text_encoder_3")
    ids = _reference_ids(tokenizer, ["a photo of a cat"], 256)
    with torch.no_grad():
        masked = model(torch.from_numpy(ids), attention_mask=torch.from_numpy(ids != 0)).last_hidden_state
    out = ours(mx.array(ids)).last_hidden_state
    assert _relative_error(out[:, :6], masked[:, :6]) > 1e-3
    changed = ids.copy()
    changed[0, 3] = tokenizer.convert_tokens_to_ids("▁dog")
    other = ours(mx.array(changed)).last_hidden_state
    assert _relative_error(other[:, :3], out[:, :3]) > 1e-3  # earlier positions see later tokens


def test_fp16_is_close_and_finite(tiny):
    folder, model, tokenizer = tiny
    ids = _reference_ids(tokenizer, PROMPTS[2:6], 256)
    with torch.no_grad():
        expected = model(torch.from_numpy(ids)).last_hidden_state
    ours = load_t5_encoder(folder / "text_encoder_3", dtype=mx.float16)
    assert ours.encoder.block[1].layer[1].DenseReluDense.wo.weight.dtype == mx.float16
    out = ours(mx.array(ids)).last_hidden_state
    assert out.dtype == mx.float16
    out = np.asarray(out.astype(mx.float32))
    assert np.isfinite(out).all()
    assert _relative_error(out, expected) <= 1e-2


def test_fp16_overflow_is_clamped_as_transformers(tmp_path):
    """Activations far past fp16's range: block 0's fp16 residual is clamped, the fp32 `wo` path never
    overflows, so the output is finite, like transformers' fp16 T5 (which keeps `wo` in fp32)."""
    from transformers import T5EncoderModel as TorchT5
    model, tokenizer = tiny_t5(tmp_path / "tokenizer", seed=6)
    with torch.no_grad():
        model.encoder.block[0].layer[0].SelfAttention.o.weight.mul_(3e4)
        model.encoder.block[0].layer[0].SelfAttention.v.weight.mul_(10)
        model.encoder.block[1].layer[1].DenseReluDense.wo.weight.mul_(1e4)
        model.encoder.block[1].layer[1].DenseReluDense.wi_1.weight.mul_(1e2)
    model.save_pretrained(str(tmp_path / "encoder"), safe_serialization=True)
    ids = _reference_ids(tokenizer, PROMPTS[2:4], 64)
    with torch.no_grad():
        full = model(torch.from_numpy(ids), output_hidden_states=True)
        reference16 = TorchT5.from_pretrained(str(tmp_path / "encoder"), dtype=torch.float16)(
            torch.from_numpy(ids)).last_hidden_state.float()
    assert full.hidden_states[1].abs().max() > 65504  # the fp32 model leaves fp16's range
    ours = load_t5_encoder(tmp_path / "encoder", dtype=mx.float16)
    first = ours.encoder.block[0].layer[0]
    after_attention = first(ours.shared(mx.array(ids)), first.SelfAttention.compute_bias(64, 64))
    assert after_attention.dtype == mx.float16 and not bool(mx.isfinite(after_attention).all())  # would overflow
    out = np.asarray(ours(mx.array(ids)).last_hidden_state.astype(mx.float32))
    assert np.isfinite(out).all() and torch.isfinite(reference16).all()
    assert _relative_error(out, reference16) <= 2e-2


def test_checkpoint_names_tied_embedding(tiny):
    folder, _, _ = tiny
    state = weight_io.read_safetensors(weight_io.safetensors_files(folder / "text_encoder_3"))
    assert "shared.weight" in state and "encoder.embed_tokens.weight" not in state  # transformers 5 saves one
    config = T5Config.from_file(folder / "text_encoder_3" / "config.json")
    expected = np.asarray(state["shared.weight"])
    variants = {
        "shared only": state,
        "both": {**state, "encoder.embed_tokens.weight": state["shared.weight"]},
        "embed_tokens only": {("encoder.embed_tokens.weight" if k == "shared.weight" else k): v
                              for k, v in state.items()},
        "full T5": {**state, "decoder.block.0.layer.0.SelfAttention.q.weight": mx.zeros((32, 32)),
                    "lm_head.weight": state["shared.weight"]},
    }
    for name, weights in variants.items():
        names = checkpoint_names(weights)
        assert "encoder.embed_tokens.weight" not in names and not any(k.startswith("decoder.") for k in names), name
        model = weight_io.load_into(T5EncoderModel(config), names)  # every name fits, both ways
        np.testing.assert_array_equal(np.asarray(model.shared.weight), expected)
    names = set(checkpoint_names(state))
    assert {"encoder.block.0.layer.0.SelfAttention.q.weight", "encoder.block.1.layer.0.SelfAttention.o.weight",
            "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            "encoder.block.1.layer.1.DenseReluDense.wi_0.weight", "encoder.block.1.layer.1.DenseReluDense.wi_1.weight",
            "encoder.block.1.layer.1.DenseReluDense.wo.weight", "encoder.block.1.layer.1.layer_norm.weight",
            "encoder.final_layer_norm.weight"} <= names
    assert "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight" not in names  # block 0 owns it


def test_fused_path_matches_transformers(tiny, monkeypatch):
    """The path a GPU takes (MLX's fused attention with the bias as mask, MLX's tanh GELU), run on the CPU."""
    from backend.engines.mlx import cpu_kernels
    folder, model, tokenizer = tiny
    ids = _reference_ids(tokenizer, PROMPTS[2:4], 256)
    with torch.no_grad():
        expected = model(torch.from_numpy(ids)).last_hidden_state
    monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    for dtype, tolerance in ((mx.float32, 1e-5), (mx.float16, 1e-2)):
        out = load_t5_encoder(folder / "text_encoder_3", dtype=dtype)(mx.array(ids)).last_hidden_state
        assert out.dtype == dtype
        assert _relative_error(out.astype(mx.float32), expected) <= tolerance, dtype


def test_fp16_stored_weights_compute_in_fp32(tmp_path):
    """compute_in(fp32) on fp16-stored weights: transformers' fp32 model with those fp16-rounded weights."""
    import mlx.core as mx
    import torch
    from backend.engines.mlx.t5 import load_t5_encoder
    from tests.tiny_t5 import tiny_t5
    model, tokenizer = tiny_t5(tmp_path / "tok")
    model.save_pretrained(str(tmp_path / "enc"), safe_serialization=True)
    mine = load_t5_encoder(tmp_path / "enc", dtype=mx.float16).compute_in(mx.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
        ids = tokenizer(["a red circle at the top"], padding="max_length", max_length=32,
                        return_tensors="pt").input_ids
        ref = model(ids).last_hidden_state.numpy()
    out = mine(mx.array(ids.numpy().astype(np.int32))).last_hidden_state
    assert out.dtype == mx.float32 and mine.shared.weight.dtype == mx.float16
    assert np.linalg.norm(np.array(out) - ref) / np.linalg.norm(ref) < 1e-5
