"""The torch modules export.py and export_sd3.py trace: each stage wrapped with Apple's Core ML input/output convention.

- `SplitEinsumAttnProcessor`: diffusers attention computed the Neural Engine way (Apple's "split
  einsum", https://machinelearning.apple.com/research/neural-engine-transformers): q, k, v laid out
  (B, C, 1, S) and one pair of einsums per head, so no (B*heads, S, S) batch reshapes are needed.
- `TextEncoderIO`, `UnetIO`, `VaeDecoderIO`, `VaeEncoderIO`: Apple's argument order and layouts
  (the UNet takes encoder_hidden_states as (B, C, 1, 77), the ANE layout).
- `UnetChunk1` / `UnetChunk2`: the UNet cut in two at a block boundary (the torch-level version of
  Apple's chunk_mlprogram.py); the first half returns every tensor the second half needs.
- SD3's MMDiT: `MMDiTIO` (Apple's single package), `MMDiTConditioning` + `MMDiTStage` (MobileDiffuser's
  split stages), and `split_mmdit`, which cuts the blocks into stages of balanced weight.
Only export.py and export_sd3.py import this (it needs torch, which the app does not).
"""
from __future__ import annotations

import torch
import torch.nn as nn


class SplitEinsumAttnProcessor:
    """Attention with per-head einsums on (B, C, 1, S) tensors; numerically equal to diffusers' default."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        if attention_mask is not None:
            raise NotImplementedError("split-einsum attention is exported without attention masks")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        image_shape = hidden_states.shape if hidden_states.ndim == 4 else None
        if image_shape is not None:
            b, c, h, w = image_shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)

        def ane_layout(x):  # (B, S, C) -> (B, C, 1, S)
            return x.transpose(1, 2).unsqueeze(2)

        q = ane_layout(attn.to_q(hidden_states))
        k = ane_layout(attn.to_k(context))
        v = ane_layout(attn.to_v(context))
        dim_head = q.shape[1] // attn.heads
        per_head = []
        for i in range(attn.heads):
            head = slice(i * dim_head, (i + 1) * dim_head)
            qh, kh, vh = q[:, head], k[:, head], v[:, head]
            # weights laid out (B, keys, 1, queries): the softmax runs over the channel axis
            weights = torch.einsum("bchq,bchk->bkhq", qh, kh) * attn.scale
            weights = weights.softmax(dim=1)
            per_head.append(torch.einsum("bkhq,bchk->bchq", weights, vh))
        out = torch.cat(per_head, dim=1).squeeze(2).transpose(1, 2)  # (B, S, C)

        out = attn.to_out[1](attn.to_out[0](out))
        if image_shape is not None:
            out = out.transpose(1, 2).reshape(image_shape)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class TextEncoderIO(nn.Module):
    """input_ids -> (hidden states the UNet conditions on, pooled output)."""

    def __init__(self, encoder, hidden_layer=None):
        super().__init__()
        self.encoder = encoder
        self.hidden_layer = hidden_layer  # None: last_hidden_state; -2 for SDXL (penultimate layer)

    def forward(self, input_ids):
        out = self.encoder(input_ids.to(torch.int32), output_hidden_states=self.hidden_layer is not None,
                           return_dict=True)
        hidden = out.last_hidden_state if self.hidden_layer is None else out.hidden_states[self.hidden_layer]
        pooled = getattr(out, "text_embeds", None)
        return hidden, pooled if pooled is not None else out.pooler_output


def _added_conditions(time_ids, text_embeds):
    return {"time_ids": time_ids, "text_embeds": text_embeds} if time_ids is not None else None


class UnetIO(nn.Module):
    """Apple's UNet signature: encoder_hidden_states arrive as (B, C, 1, S)."""

    def __init__(self, unet, extra_inputs=()):
        super().__init__()
        self.unet = unet
        self.extra_inputs = tuple(extra_inputs)  # ("time_ids", "text_embeds") and/or ("timestep_cond",)

    def forward(self, sample, timestep, encoder_hidden_states, *extra):
        named = dict(zip(self.extra_inputs, extra))
        hidden = encoder_hidden_states.squeeze(2).transpose(1, 2)
        return self.unet(sample, timestep, hidden, timestep_cond=named.get("timestep_cond"),
                         added_cond_kwargs=_added_conditions(named.get("time_ids"), named.get("text_embeds")),
                         return_dict=False)[0]


class VaeDecoderIO(nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.post_quant_conv = vae.post_quant_conv
        self.decoder = vae.decoder

    def forward(self, z):
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)


class VaeEncoderIO(nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.encoder = vae.encoder
        self.quant_conv = vae.quant_conv

    def forward(self, x):
        moments = self.encoder(x)
        return self.quant_conv(moments) if self.quant_conv is not None else moments


# ------------------------------------------------------------------ the UNet in two halves

def unet_segments(unet) -> list:
    """The UNet's blocks in running order: ("down", i) ..., ("mid", 0), ("up", j) ..."""
    segments = [("down", i) for i in range(len(unet.down_blocks))]
    if unet.mid_block is not None:
        segments.append(("mid", 0))
    return segments + [("up", i) for i in range(len(unet.up_blocks))]


def _block(unet, segment):
    kind, i = segment
    return unet.mid_block if kind == "mid" else (unet.down_blocks if kind == "down" else unet.up_blocks)[i]


def _parameter_count(module) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def balanced_split(unet) -> int:
    """How many segments go to the first half so both halves hold about the same weights."""
    segments = unet_segments(unet)
    total = _parameter_count(unet)
    head = total - sum(_parameter_count(_block(unet, s)) for s in segments) - _parameter_count(unet.conv_out)
    best, best_gap, first = 1, None, head
    for k, segment in enumerate(segments[:-1], start=1):
        first += _parameter_count(_block(unet, segment))
        gap = abs(2 * first - total)
        if best_gap is None or gap < best_gap:
            best, best_gap = k, gap
    return best


def check_chunkable(unet) -> None:
    cfg = unet.config
    if cfg.class_embed_type is not None or cfg.addition_embed_type not in (None, "text_time") \
            or unet.encoder_hid_proj is not None or cfg.center_input_sample:
        raise ValueError("this UNet's conditioning (class/image embeddings) cannot be chunked")


def _run_segments(unet, segments, sample, emb, hidden, skips):
    """Run `segments` in order; `skips` is the list of down-block residuals (consumed by up blocks)."""
    # diffusers passes explicit upsample sizes when the latent size is not a multiple of the total
    # upsampling; skips[0] (conv_in's output, consumed last) has the latent's size
    needs_size = any(d % (2 ** unet.num_upsamplers) for d in skips[0].shape[-2:])
    for kind, i in segments:
        block = _block(unet, (kind, i))
        cross = getattr(block, "has_cross_attention", False)
        if kind == "down":
            if cross:
                sample, res = block(hidden_states=sample, temb=emb, encoder_hidden_states=hidden)
            else:
                sample, res = block(hidden_states=sample, temb=emb)
            skips.extend(res)
        elif kind == "mid":
            sample = block(sample, emb, encoder_hidden_states=hidden) if cross else block(sample, emb)
        else:
            n = len(block.resnets)
            res, skips[:] = tuple(skips[-n:]), skips[:-n]
            last = i == len(unet.up_blocks) - 1
            size = skips[-1].shape[2:] if needs_size and not last else None
            kwargs = dict(encoder_hidden_states=hidden) if cross else {}
            sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=res, upsample_size=size, **kwargs)
    return sample


class UnetChunk1(nn.Module):
    """Time embedding, conv_in and the first `split` blocks; returns (sample, temb, *skips)."""

    def __init__(self, unet, split, extra_inputs=()):
        super().__init__()
        check_chunkable(unet)
        self.unet = unet
        self.segments = unet_segments(unet)[:split]
        self.extra_inputs = tuple(extra_inputs)

    def forward(self, sample, timestep, encoder_hidden_states, *extra):
        named = dict(zip(self.extra_inputs, extra))
        unet = self.unet
        hidden = encoder_hidden_states.squeeze(2).transpose(1, 2)
        emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), named.get("timestep_cond"))
        if unet.config.addition_embed_type == "text_time":
            emb = emb + unet.get_aug_embed(emb=emb, encoder_hidden_states=hidden, added_cond_kwargs=_added_conditions(
                named["time_ids"], named["text_embeds"]))
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        sample = unet.conv_in(sample)
        skips = [sample]
        sample = _run_segments(unet, self.segments, sample, emb, hidden, skips)
        return (sample, emb, *skips)


class UnetChunk2(nn.Module):
    """The remaining blocks and the output convolution; takes what UnetChunk1 returned (+ the text)."""

    def __init__(self, unet, split):
        super().__init__()
        self.unet = unet
        self.segments = unet_segments(unet)[split:]
        self.uses_text = any(getattr(_block(unet, s), "has_cross_attention", False) for s in self.segments)

    def forward(self, sample, emb, *rest):
        if self.uses_text:
            hidden, skips = rest[0].squeeze(2).transpose(1, 2), list(rest[1:])
        else:
            hidden, skips = None, list(rest)
        unet = self.unet
        sample = _run_segments(unet, self.segments, sample, emb, hidden, skips)
        if unet.conv_norm_out is not None:
            sample = unet.conv_act(unet.conv_norm_out(sample))
        return unet.conv_out(sample)


def skip_count(unet, split) -> int:
    """How many down-block residuals are still unused after the first `split` segments."""
    count = 1  # conv_in's output
    for kind, i in unet_segments(unet)[:split]:
        block = _block(unet, (kind, i))
        if kind == "down":
            count += len(block.resnets) + (len(block.downsamplers) if block.downsamplers is not None else 0)
        elif kind == "up":
            count -= len(block.resnets)
    return count


# ------------------------------------------------------------------ SD3's MMDiT (Apple's and MobileDiffuser's IO)
#
# Apple's single package (apple/ml-stable-diffusion torch2coreml.py::convert_mmdit, DiffusionKit's MMDiT):
#   latent_image_embeddings (B, 16, h, w), token_level_text_embeddings (B, 4096, 1, S),
#   pooled_text_embeddings (B, 2048, 1, 1), timestep (B,) = sigma * 1000  ->  denoiser_output (B, 16, h, w)
# MobileDiffuser's split (scripts/convert_sd3_medium_split_coreml.py):
#   Conditioning: pooled_text_embeddings, timestep -> modulation_inputs (B, dim) (diffusers' temb)
#   Stage0: latent_image_embeddings (NCHW), token_level_text_embeddings (BC1S) [, modulation_inputs]
#   StageK: latent_image_embeddings (B, N, dim), token_level_text_embeddings (B, S, dim), modulation_inputs
#   non-final stages -> latent_image_embeddings_out, token_level_text_embeddings_out; the last -> noise_pred
# Every wrapper runs diffusers' own modules (PatchEmbed, CombinedTimestepTextProjEmbeddings, JointTransformerBlock,
# AdaLayerNormContinuous), so SD3.5's q/k RMS norms and dual-attention blocks are diffusers' math too.

MMDIT_LATENT = "latent_image_embeddings"
MMDIT_TEXT = "token_level_text_embeddings"
MMDIT_POOLED = "pooled_text_embeddings"
MMDIT_MODULATION = "modulation_inputs"


def _unpatchify(x, patch: int, channels: int, height: int, width: int):
    """(B, h/p * w/p, p*p*C) -> (B, C, h, w): diffusers' einsum "nhwpqc->nchpwq" as a permute."""
    b = x.shape[0]
    h, w = height // patch, width // patch
    x = x.reshape(b, h, w, patch, patch, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, channels, h * patch, w * patch)


class MMDiTConditioning(nn.Module):
    """pooled (B, P, 1, 1) + timestep (B,) -> modulation_inputs (B, dim): diffusers' time_text_embed."""

    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer

    def forward(self, pooled_text_embeddings, timestep):
        return self.transformer.time_text_embed(timestep, pooled_text_embeddings.flatten(1))


class MMDiTStage(nn.Module):
    """Transformer blocks [first, last) of an SD3 MMDiT; `embed`: starts with pos_embed + context_embedder
    (latents NCHW, text BC1S); `final`: ends with norm_out + proj_out + unpatchify (-> noise_pred)."""

    def __init__(self, transformer, first: int, last: int, embed: bool, final: bool, latent_size=None):
        super().__init__()
        self.transformer = transformer
        self.first, self.last, self.embed, self.final = first, last, embed, final
        self.latent_size = tuple(latent_size) if latent_size is not None else None
        if final and last != len(transformer.transformer_blocks):
            raise ValueError("the final stage must end with the last transformer block")
        if final and not embed and self.latent_size is None:
            raise ValueError("a final stage without the embedding needs the latent size to unpatchify")

    @property
    def input_names(self) -> list:
        names = [MMDIT_LATENT, MMDIT_TEXT]
        return names + [MMDIT_MODULATION] if self.last > self.first else names

    @property
    def output_names(self) -> list:
        return ["noise_pred"] if self.final else [MMDIT_LATENT + "_out", MMDIT_TEXT + "_out"]

    def forward(self, latent_image_embeddings, token_level_text_embeddings, modulation_inputs=None):
        t = self.transformer
        hidden, context, temb = latent_image_embeddings, token_level_text_embeddings, modulation_inputs
        height, width = self.latent_size or (None, None)
        if self.embed:
            height, width = hidden.shape[-2:]
            hidden = t.pos_embed(hidden)
            context = t.context_embedder(context.squeeze(2).transpose(1, 2))
        for block in t.transformer_blocks[self.first:self.last]:
            context, hidden = block(hidden_states=hidden, encoder_hidden_states=context, temb=temb)
        if not self.final:
            return hidden, context
        hidden = t.proj_out(t.norm_out(hidden, temb))
        return _unpatchify(hidden, t.config.patch_size, t.out_channels, int(height), int(width))


class MMDiTIO(nn.Module):
    """The whole MMDiT with Apple's names: latents, BC1S text, (B, P, 1, 1) pooled, timestep -> velocity."""

    def __init__(self, transformer):
        super().__init__()
        self.conditioning = MMDiTConditioning(transformer)
        self.body = MMDiTStage(transformer, 0, len(transformer.transformer_blocks), embed=True, final=True)

    def forward(self, latent_image_embeddings, token_level_text_embeddings, pooled_text_embeddings, timestep):
        temb = self.conditioning(pooled_text_embeddings, timestep)
        return self.body(latent_image_embeddings, token_level_text_embeddings, temb)


def mmdit_weight_counts(transformer, latent_size) -> tuple:
    """(embedding, [per block], output) weight counts; the position table counts only the part used at
    `latent_size` (the converter keeps just that slice)."""
    t = transformer
    patch = t.config.patch_size
    cells = (latent_size[0] // patch) * (latent_size[1] // patch)
    embed = (_parameter_count(t.pos_embed) + _parameter_count(t.context_embedder)
             + cells * t.inner_dim)  # pos_embed's table is a buffer, cropped to the latent grid
    blocks = [_parameter_count(b) for b in t.transformer_blocks]
    out = _parameter_count(t.norm_out) + _parameter_count(t.proj_out)
    return embed, blocks, out


def split_mmdit(weights: tuple, stages: int) -> list:
    """Block ranges [(first, last), ...] for `stages` packages: Stage0 holds the embedding, the last one the
    output layers, every stage after Stage0 at least one block; the largest stage is as small as it can be."""
    embed, blocks, out = weights
    n = len(blocks)
    if not 1 <= stages <= n + 1:
        raise ValueError(f"an MMDiT with {n} blocks splits into 1 to {n + 1} stages, not {stages}")
    # a partition of the units [embedding, block 0, ..., block n-1 + output layers] into contiguous stages
    units = [embed] + blocks[:-1] + [blocks[-1] + out]
    m = len(units)
    prefix = [0]
    for u in units:
        prefix.append(prefix[-1] + u)
    inf = float("inf")
    # best[k][i]: the smallest largest stage when the first i units form k stages
    best = [[inf] * (m + 1) for _ in range(stages + 1)]
    cut = [[0] * (m + 1) for _ in range(stages + 1)]
    best[0][0] = 0
    for k in range(1, stages + 1):
        for i in range(1, m + 1):
            for j in range(k - 1, i):
                cost = max(best[k - 1][j], prefix[i] - prefix[j])
                if cost < best[k][i]:
                    best[k][i], cut[k][i] = cost, j
    bounds, i = [], m
    for k in range(stages, 0, -1):
        j = cut[k][i]
        bounds.append((j, i))
        i = j
    bounds.reverse()
    # unit u >= 1 is block u - 1: a stage over units [j, i) holds blocks [max(j, 1) - 1, i - 1)
    return [(max(j, 1) - 1, i - 1) for j, i in bounds]
