"""backend.engines.mlx.clip against transformers' CLIPTextModel / CLIPTextModelWithProjection.

Tiny random-weight torch models are saved with save_pretrained (safetensors), loaded into MLX through
backend.engines.mlx.weights, and compared on padded prompts (pad == eos as in SD 1.x, "!" = id 0 as in
SD 2.x) for both pooling rules (legacy eos_token_id 2 -> argmax of ids; a real eos id -> its first position).
"""
import json

import mlx.core as mx
import numpy as np
import pytest
import torch

from backend.engines.mlx import weights as weight_io
from backend.engines.mlx.clip import CLIPTextConfig, CLIPTextModel, checkpoint_names, load_text_encoder

VOCAB = 99
BOS, EOS = VOCAB - 2, VOCAB - 1


def _ids(pad_id: int) -> np.ndarray:
    """Two (B, 77) rows like the tokenizer makes: bos, words, eos, padding."""
    rng = np.random.default_rng(0)
    rows = []
    for length in (5, 20):
        words = rng.integers(1, VOCAB - 2, size=length)
        row = np.full(77, pad_id, dtype=np.int64)
        row[0], row[1:1 + length], row[1 + length] = BOS, words, EOS
        rows.append(row)
    return np.stack(rows)


def _torch_model(with_projection: bool, act: str, eos_token_id: int):
    from transformers import CLIPTextConfig as TorchConfig, CLIPTextModel as TorchModel
    from transformers import CLIPTextModelWithProjection
    torch.manual_seed(0)
    config = TorchConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                         num_attention_heads=4, max_position_embeddings=77, hidden_act=act, projection_dim=24,
                         layer_norm_eps=1e-5, bos_token_id=BOS, eos_token_id=eos_token_id, pad_token_id=1)
    model = (CLIPTextModelWithProjection if with_projection else TorchModel)(config).eval()
    with torch.no_grad():  # make layer norms and biases non-trivial too
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


CASES = [  # (with_projection, activation, eos_token_id, pad id)
    (False, "quick_gelu", 2, EOS),      # SD 1.x
    (False, "gelu", 2, 0),              # SD 2.x ("!" pad)
    (True, "gelu", 2, 0),               # SDXL's second encoder
    (False, "quick_gelu", EOS, EOS),    # post-#24773 configs
    (True, "quick_gelu", EOS, 0),
]


def _relative_error(actual, expected) -> float:
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    return float(np.abs(actual - expected).max() / (np.abs(expected).max() + 1e-12))


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"proj{int(c[0])}-{c[1]}-eos{c[2]}-pad{c[3]}")
def saved(request, tmp_path_factory):
    with_projection, act, eos_token_id, pad_id = request.param
    model = _torch_model(with_projection, act, eos_token_id)
    folder = tmp_path_factory.mktemp("clip")
    model.save_pretrained(str(folder), safe_serialization=True)
    ids = _ids(pad_id)
    with torch.no_grad():
        out = model(torch.from_numpy(ids), output_hidden_states=True)
    pooled = out.pooler_output if not with_projection else None
    return folder, ids, out, pooled, with_projection


def test_config_from_dict(saved):
    folder, _, _, _, with_projection = saved
    raw = json.loads((folder / "config.json").read_text())
    config = CLIPTextConfig.from_dict(raw)
    assert config.with_projection == with_projection
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (32, 3, 4)
    assert config.hidden_act == raw["hidden_act"] and config.eos_token_id == raw["eos_token_id"]
    with pytest.raises(ValueError, match="activation"):
        CLIPTextConfig.from_dict({**raw, "hidden_act": "relu"})


def test_matches_transformers_fp32(saved):
    folder, ids, reference, torch_pooled, with_projection = saved
    model = load_text_encoder(folder)
    out = model(mx.array(ids, dtype=mx.int32))
    layers = model.config.num_hidden_layers
    assert len(out.hidden_states) == len(reference.hidden_states) == layers + 1
    assert _relative_error(out.last_hidden_state, reference.last_hidden_state) <= 1e-4
    assert _relative_error(out.hidden_states[-2], reference.hidden_states[-2]) <= 1e-4
    assert _relative_error(out.hidden_states[0], reference.hidden_states[0]) <= 1e-6
    # pooled: transformers' rule, reproduced from the reference's own last_hidden_state
    eos_rows = [int(np.argmax(r)) if model.config.eos_token_id == 2 else int(np.argmax(r == model.config.eos_token_id))
                for r in ids]
    expected_pooled = reference.last_hidden_state[torch.arange(len(ids)), eos_rows]
    assert eos_rows == [6, 21]  # the real eos, not a pad copy of it
    assert _relative_error(out.pooled_output, expected_pooled) <= 1e-4
    if torch_pooled is not None:
        assert _relative_error(out.pooled_output, torch_pooled) <= 1e-4
    if with_projection:
        assert out.text_embeds.shape == (2, 24)
        assert _relative_error(out.text_embeds, reference.text_embeds) <= 1e-4
    else:
        assert out.text_embeds is None


@pytest.mark.parametrize("as_rows", [False, True], ids=["mlx-between-kernels", "numpy-rows"])
def test_cpu_inference_kernels_match_transformers(saved, monkeypatch, as_rows):
    """At CPU inference (as engine.encode_text runs it) the MLP's activation is a numpy kernel with fc1's bias folded
    in, quick GELU or erf GELU, and the causal attention the numpy one: the same outputs as transformers. Above
    ROWS_MIN_ELEMENTS each layer runs as numpy rows from its first LayerNorm to its last residual (as_rows)."""
    from backend.engines.mlx import clip, cpu_kernels, layers
    folder, ids, reference, _, with_projection = saved
    model = load_text_encoder(folder)
    monkeypatch.setattr(layers, "NUMPY_KERNEL_MIN", 0)  # the tiny model's calls are far below the thresholds
    if as_rows:
        monkeypatch.setattr(clip, "ROWS_MIN_ELEMENTS", 0)
    calls = []
    kernels = {act: (lambda f: lambda h, bias=None, **kw: calls.append((f.__name__, kw)) or f(h, bias, **kw))(f)
               for act, f in clip._ROW_ACTIVATIONS.items()}
    monkeypatch.setattr(clip, "_ROW_ACTIVATIONS", kernels)
    with cpu_kernels.eager_chunks():
        out = model(mx.array(ids, dtype=mx.int32))
        mx.eval(out.last_hidden_state)
    act = json.loads((folder / "config.json").read_text())["hidden_act"]
    how = {"rows": True, "in_place": True} if as_rows else {}
    assert calls == [({"gelu": "gelu", "quick_gelu": "quick_gelu"}[act], how)] * model.config.num_hidden_layers
    assert _relative_error(out.last_hidden_state, reference.last_hidden_state) <= 1e-4
    assert _relative_error(out.hidden_states[-2], reference.hidden_states[-2]) <= 1e-4
    if with_projection:
        assert _relative_error(out.text_embeds, reference.text_embeds) <= 1e-4


def test_fp16_is_close(saved):
    folder, ids, reference, _, with_projection = saved
    model = load_text_encoder(folder, dtype=mx.float16)
    out = model(mx.array(ids, dtype=mx.int32))
    assert out.last_hidden_state.dtype == mx.float16
    for got, want in ((out.last_hidden_state, reference.last_hidden_state),
                      (out.hidden_states[-2], reference.hidden_states[-2])):
        got = np.asarray(got.astype(mx.float32))
        assert np.isfinite(got).all()
        assert _relative_error(got, want) <= 1e-2
    if with_projection:
        assert _relative_error(out.text_embeds.astype(mx.float32), reference.text_embeds) <= 1e-2


def test_parameter_names_mirror_checkpoint(saved):
    folder, _, _, _, with_projection = saved
    state = weight_io.read_safetensors(weight_io.safetensors_files(folder))
    names = set(checkpoint_names(state))
    assert "text_model.embeddings.token_embedding.weight" in names
    assert "text_model.encoder.layers.0.self_attn.q_proj.weight" in names
    assert "text_model.final_layer_norm.weight" in names
    assert ("text_projection.weight" in names) == with_projection
    model = CLIPTextModel(CLIPTextConfig.from_file(folder / "config.json"))
    weight_io.load_into(model, checkpoint_names(state))  # every name fits, both ways


def test_single_row_and_short_sequence():
    model = CLIPTextModel(CLIPTextConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, eos_token_id=EOS))
    out = model(mx.array([BOS, 5, 6, EOS], dtype=mx.int32))
    assert out.last_hidden_state.shape == (1, 4, 16) and out.pooled_output.shape == (1, 16)
    np.testing.assert_allclose(np.asarray(out.pooled_output[0]), np.asarray(out.last_hidden_state[0, 3]))
    # causal: a later token does not change earlier positions
    other = model(mx.array([BOS, 5, 7, EOS], dtype=mx.int32))
    np.testing.assert_allclose(np.asarray(other.last_hidden_state[0, :2]), np.asarray(out.last_hidden_state[0, :2]),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="positions"):
        model(mx.zeros((1, 78), dtype=mx.int32))


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_family_conditioning_matches_diffusers(family, tiny_pipelines):
    """The caller's family logic on CLIPOutput reproduces diffusers' encode_prompt on the tiny pipelines."""
    from backend.tokenizer import CLIPTokenizer
    pipe, folder = tiny_pipelines(family)
    prompt = "a photo of an astronaut riding a horse on mars!"
    with torch.no_grad():
        expected = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    if family != "sdxl":
        ids = CLIPTokenizer.from_folder(folder / "tokenizer").batch([prompt])
        out = load_text_encoder(folder / "text_encoder")(mx.array(ids))
        assert _relative_error(out.last_hidden_state, expected[0]) <= 1e-4
        return
    outputs = [load_text_encoder(folder / f"text_encoder{s}")(mx.array(
        CLIPTokenizer.from_folder(folder / f"tokenizer{s}").batch([prompt]))) for s in ("", "_2")]
    prompt_embeds = mx.concatenate([o.hidden_states[-2] for o in outputs], axis=-1)
    assert _relative_error(prompt_embeds, expected[0]) <= 1e-4
    assert _relative_error(outputs[1].text_embeds, expected[2]) <= 1e-4


@pytest.mark.parametrize("cpu_kernels_on", [False, True], ids=["mlx", "cpu-kernels"])
def test_conditioning_matches_transformers_and_skips_unused_layers(saved, monkeypatch, cpu_kernels_on):
    """conditioning(): the hidden state and projected pooled output a pipeline asks for, equal to transformers',
    with every layer after the asked hidden state run only where the pooled output needs it: none for the
    penultimate state alone, and the last layer for the eos rows only (at_rows) when the pooled output is asked."""
    import contextlib
    from backend.engines.mlx import clip, cpu_kernels, layers
    folder, ids, reference, torch_pooled, with_projection = saved
    model = load_text_encoder(folder)
    if cpu_kernels_on:
        monkeypatch.setattr(layers, "NUMPY_KERNEL_MIN", 0)
    full_calls, row_calls = [], []
    call, at_rows = clip.CLIPEncoderLayer.__call__, clip.CLIPEncoderLayer.at_rows
    monkeypatch.setattr(clip.CLIPEncoderLayer, "__call__", lambda self, x: full_calls.append(1) or call(self, x))
    monkeypatch.setattr(clip.CLIPEncoderLayer, "at_rows",
                        lambda self, x, p: row_calls.append(x.shape[1]) or at_rows(self, x, p))
    layer_count = model.config.num_hidden_layers
    pooled_reference = reference.text_embeds if with_projection else torch_pooled
    with cpu_kernels.eager_chunks() if cpu_kernels_on else contextlib.nullcontext():
        for layer, pooled, runs, rows in ((-1, False, layer_count, []), (-1, True, layer_count, []),
                                          (-2, False, layer_count - 1, []), (-2, True, layer_count - 1, [77])):
            full_calls.clear(), row_calls.clear()
            hidden, pooled_out = model.conditioning(mx.array(ids, dtype=mx.int32), layer, pooled)
            expected = reference.last_hidden_state if layer == -1 else reference.hidden_states[layer]
            assert _relative_error(hidden, expected) <= 1e-4
            assert (len(full_calls), row_calls) == (runs, rows)
            if not pooled:
                assert pooled_out is None
                continue
            if pooled_reference is None:  # no projection and legacy pooling: transformers' rule from its own states
                eos = [int(np.argmax(r)) if model.config.eos_token_id == 2
                       else int(np.argmax(r == model.config.eos_token_id)) for r in ids]
                pooled_reference = reference.last_hidden_state[torch.arange(len(ids)), eos]
            assert _relative_error(pooled_out, pooled_reference) <= 1e-4
    with pytest.raises(ValueError, match="outside"):
        model.conditioning(mx.array(ids, dtype=mx.int32), -layer_count - 2)
