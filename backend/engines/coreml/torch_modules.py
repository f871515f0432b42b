"""The torch modules export.py traces: each stage wrapped with Apple's Core ML input/output convention.

- `SplitEinsumAttnProcessor`: diffusers attention computed the Neural Engine way (Apple's "split
  einsum", https://machinelearning.apple.com/research/neural-engine-transformers): q, k, v laid out
  (B, C, 1, S) and one pair of einsums per head, so no (B*heads, S, S) batch reshapes are needed.
- `TextEncoderIO`, `UnetIO`, `VaeDecoderIO`, `VaeEncoderIO`: Apple's argument order and layouts
  (the UNet takes encoder_hidden_states as (B, C, 1, 77), the ANE layout).
- `UnetChunk1` / `UnetChunk2`: the UNet cut in two at a block boundary (the torch-level version of
  Apple's chunk_mlprogram.py); the first half returns every tensor the second half needs.
Only export.py imports this (it needs torch, which the app does not).
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
