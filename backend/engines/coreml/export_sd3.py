"""SD3 / SD3.5's MMDiT -> Core ML packages: what export.py's `export` runs for a checkpoint with a `transformer`.

The MMDiT in MobileDiffuser's split layout (TWWinde/MobileDiffuser scripts/convert_sd3_medium_split_coreml.py),
float32 inputs and outputs:

  MMDiT conditioning  pooled_text_embeddings (B, P, 1, 1), timestep (B,) = sigma * 1000
                      -> modulation_inputs (B, dim)  (diffusers' time_text_embed: temb)
  MMDiT stage 0       latent_image_embeddings (B, 16, h, w), token_level_text_embeddings (B, J, 1, 77 + T)
                      [+ modulation_inputs when it holds blocks] -> pos_embed + context_embedder (+ blocks)
                      -> latent_image_embeddings_out (B, N, dim), token_level_text_embeddings_out (B, S, dim)
  MMDiT stage k       latent_image_embeddings (B, N, dim), token_level_text_embeddings (B, S, dim),
                      modulation_inputs -> the same names + "_out"; the last stage (blocks + norm_out + proj_out
                      + unpatchify) -> noise_pred (B, 16, h, w), the flow-matching velocity

The blocks are split so that no stage's weights exceed MAX_STAGE_BYTES (`mmdit_stages` overrides), or,
with `mmdit_layout="single"`, the whole MMDiT is one package with Apple's names (apple/ml-stable-diffusion
torch2coreml.py::convert_mmdit): the four inputs above -> denoiser_output. No T5 encoder is exported: its
`t5_tokens` tokens (77 as Apple and MobileDiffuser) are zeros at generation time.

The text encoders, the VAE decoder, the small files and the manifest are export.py's, as for the UNets.
"""
from __future__ import annotations

import time

import numpy as np

from backend.engines.coreml import resources as res
from backend.engines.coreml.conversion import convert
from backend.types import UserError

MMDIT_LAYOUTS = ("split", "single")
MAX_STAGE_BYTES = 1_000_000_000  # a split MMDiT's stages stay under ~1 GB of weights each


def check_sd3_settings(attention, chunk_unet, layout, stages, t5_tokens, config, latent_size) -> None:
    """A UserError for an export setting SD3's MMDiT cannot take."""
    if attention != "original":
        raise UserError("SD3's MMDiT is exported with original attention only (as Apple's and MobileDiffuser's).")
    if chunk_unet:
        raise UserError("SD3 has no UNet to chunk: its MMDiT is split with --stages N.")
    if layout not in MMDIT_LAYOUTS:
        raise UserError(f"mmdit_layout must be split or single, not {layout!r}.")
    if stages is not None and layout == "single":
        raise UserError("--stages splits the MMDiT; the single layout is one package.")
    blocks = int(config.get("num_layers", 0))
    if stages is not None and not 1 <= int(stages) <= blocks + 1:
        raise UserError(f"this MMDiT has {blocks} blocks: --stages must be from 1 to {blocks + 1}, not {stages}.")
    if not 1 <= int(t5_tokens) <= 512:
        raise UserError(f"t5_tokens must be from 1 to 512, not {t5_tokens}.")
    patch = int(config.get("patch_size", 2))
    if any(int(d) % patch for d in latent_size):
        raise UserError(f"SD3 latents must be a multiple of the patch size {patch}: {tuple(latent_size)} is not.")
    cells = config.get("pos_embed_max_size")
    if cells and any(int(d) // patch > int(cells) for d in latent_size):
        raise UserError(f"this MMDiT's position table covers {int(cells) * patch}x{int(cells) * patch} latents; "
                        f"{tuple(latent_size)} is larger.")


def _mmdit_example(exporter) -> dict:
    import torch
    t = exporter.parts["transformer"]
    b, (h, w) = exporter.settings["unet_batch_size"], exporter.settings["latent_size"]
    return {"latent_image_embeddings": torch.randn(b, t.config.in_channels, h, w),
            "token_level_text_embeddings": torch.randn(b, t.config.joint_attention_dim, 1,
                                                       exporter.text_length + exporter.settings["t5_tokens"]),
            "pooled_text_embeddings": torch.randn(b, t.config.pooled_projection_dim, 1, 1),
            "timestep": torch.full((b,), 750.0)}


def mmdit_plan(exporter) -> list:
    """Block ranges of the MMDiT stages: as asked, else the fewest whose weights each fit MAX_STAGE_BYTES."""
    from backend.engines.coreml import torch_modules as tm
    t = exporter.parts["transformer"]
    weights = tm.mmdit_weight_counts(t, exporter.settings["latent_size"])
    if exporter.settings["mmdit_stages"] is not None:
        return tm.split_mmdit(weights, int(exporter.settings["mmdit_stages"]))
    per_weight = 2 if exporter.fp16 else 4
    most = len(t.transformer_blocks) + 1
    for stages in range(1, most + 1):
        plan = tm.split_mmdit(weights, stages)
        if max(_stage_weights(weights, plan)) * per_weight <= MAX_STAGE_BYTES:
            return plan
    return tm.split_mmdit(weights, most)


def export_mmdit(exporter) -> None:
    """The MMDiT's packages, written by `exporter` (export.py's): split stages checked against the whole."""
    import torch
    from backend.engines.coreml import torch_modules as tm
    t = exporter.parts["transformer"]
    example = _mmdit_example(exporter)
    f32 = lambda names: {n: np.float32 for n in names}  # noqa: E731  (MobileDiffuser: float32 I/O)
    if exporter.settings["mmdit_layout"] == "single":
        t0 = time.perf_counter()
        exporter.save(res.MMDIT, convert(tm.MMDiTIO(t), example, f32(example), f32(["denoiser_output"]), exporter.fp16),
                      t0, {res.META_MMDIT_BLOCKS: f"0:{len(t.transformer_blocks)}"})
        return
    plan = mmdit_plan(exporter)
    exporter.mmdit_blocks = plan
    with torch.no_grad():
        reference = tm.MMDiTIO(t)(*example.values())
    t0 = time.perf_counter()
    conditioning = {n: example[n] for n in ("pooled_text_embeddings", "timestep")}
    exporter.save(res.MMDIT_CONDITIONING, convert(tm.MMDiTConditioning(t), conditioning, f32(conditioning),
                                                  f32(["modulation_inputs"]), exporter.fp16), t0)
    with torch.no_grad():
        named = {**example, "modulation_inputs": tm.MMDiTConditioning(t)(*conditioning.values())}
    latent_size = tuple(exporter.settings["latent_size"])
    for k, (first, last) in enumerate(plan):
        t0 = time.perf_counter()
        module = tm.MMDiTStage(t, first, last, embed=k == 0, final=k == len(plan) - 1, latent_size=latent_size)
        inputs = {n: named[n] for n in module.input_names}
        exporter.save(f"{res.MMDIT_STAGE}{k}", convert(module, inputs, f32(inputs), f32(module.output_names),
                                                       exporter.fp16), t0, {res.META_MMDIT_BLOCKS: f"{first}:{last}"})
        with torch.no_grad():
            out = module(*inputs.values())
        out = out if isinstance(out, tuple) else (out,)
        named.update({n[:-4] if n.endswith("_out") else n: v for n, v in zip(module.output_names, out)})
    if not torch.allclose(named["noise_pred"], reference, atol=1e-4, rtol=1e-3):
        raise RuntimeError("the MMDiT stages do not reproduce the whole transformer")


def _stage_weights(weights: tuple, plan: list) -> list:
    """Weights of each MMDiT stage of `plan` (block ranges): Stage0 adds the embedding, the last the output."""
    embed, blocks, out = weights
    sizes = [sum(blocks[a:b]) for a, b in plan]
    sizes[0] += embed
    sizes[-1] += out
    return sizes
