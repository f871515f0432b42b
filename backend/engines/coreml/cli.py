"""`python -m backend export-coreml`: a diffusers model -> Core ML resources in Apple's layout (export.py).

Conversion needs torch, diffusers and transformers (requirements-convert.txt); without them the command
says so in one line instead of failing on an import deep inside the converter.
"""
from __future__ import annotations

import importlib.util
import json

from backend.types import UserError

ATTENTIONS = ("original", "split_einsum")


def _require_converters() -> None:
    """Checked before anything is downloaded or imported (importing torch alone takes seconds)."""
    missing = []
    for module in ("torch", "diffusers", "transformers", "coremltools"):
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # ValueError: a module set to None in sys.modules
            found = False
        if not found:
            missing.append(module)
    if missing:
        raise UserError(f"export-coreml needs {', '.join(missing)}, which are not installed: "
                        "pip install -r requirements-convert.txt")


def cmd_export_coreml(a) -> int:
    from backend import lora, registry
    loras = lora.normalize(a.lora)  # a missing or non-safetensors LoRA fails before anything loads
    _require_converters()
    from backend.engines.coreml.export import export, latent_size_for
    source = registry.resolve(a.model, progress=print)
    latent_size = latent_size_for(source, a.size) if a.size else None
    found = export(source, a.out, attention=a.attention, chunk_unet=a.chunk_unet, precision=a.precision,
                   unet_batch_size=a.unet_batch_size, vae_encoder=a.vae_encoder, latent_size=latent_size,
                   mmdit_stages=a.stages, mmdit_layout=a.mmdit_layout, t5_tokens=a.t5_tokens, loras=loras)
    stages = {stage: found.disk_bytes[stage] for stage in found.models}
    if a.json:
        print(json.dumps({"out": str(found.folder), "attention": found.attention, "chunked": found.chunked,
                          "sd3": found.is_sd3, "denoiser_stages": found.denoiser_stages,
                          "stages": stages, "bytes": found.total_bytes,
                          "seconds": found.manifest.get("seconds")}))
    else:
        sizes = ", ".join(f"{stage} {n / 1e6:.1f} MB" for stage, n in stages.items())
        print(f"{found.folder}: {found.attention} attention, {a.precision}; {sizes}")
    return 0


def add_command(sub) -> None:
    p = sub.add_parser("export-coreml", help="convert a diffusers model to Core ML resources (Apple's layout)")
    p.add_argument("--model", required=True, help="diffusers model folder, registry name or Hub id")
    p.add_argument("--out", required=True, help="the resources folder to write (must not exist yet)")
    p.add_argument("--attention", default="original", choices=ATTENTIONS,
                   help="original (GPU) or split_einsum (Neural Engine)")
    p.add_argument("--chunk-unet", action="store_true", help="split the UNet in two packages (iOS-sized files)")
    p.add_argument("--precision", default="fp16", choices=["fp16", "fp32"])
    p.add_argument("--unet-batch-size", type=int, default=2, choices=[1, 2],
                   help="2 for classifier-free guidance (Apple's default), 1 for guidance-free models "
                        "(SD3: the MMDiT's batch)")
    p.add_argument("--size", type=int, help="image size in pixels the denoiser is exported for (square; default "
                                            "the model's native size, e.g. 1024 for SD3, 512 for MobileDiffuser)")
    p.add_argument("--stages", type=int, help="SD3: MMDiT stage packages (MobileDiffuser's split layout); default: "
                                              "as few as keep each under ~1 GB of weights")
    p.add_argument("--mmdit-layout", default="split", choices=["split", "single"],
                   help="SD3: split stages (MobileDiffuser) or one MultiModalDiffusionTransformer package (Apple)")
    p.add_argument("--t5-tokens", type=int, default=77,
                   help="SD3: T5 tokens after CLIP's 77 the MMDiT takes (zeros without T5; 77 as Apple)")
    p.add_argument("--vae-encoder", action="store_true", help="also export the VAE encoder (image to image)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="bake a LoRA (.safetensors) into the weights at this scale (default 1.0); repeatable. "
                        "Core ML weights are fixed, so this is how Core ML runs a LoRA")
    p.add_argument("--json", action="store_true", help="print one JSON line describing the export")
    p.set_defaults(func=cmd_export_coreml)
