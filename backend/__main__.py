"""The command line: `python -m backend generate|bench|export-coreml|quantize ...`.

Bad arguments and user errors exit non-zero with a one-line reason on stderr.
"""
from __future__ import annotations

import argparse
import json
import sys

import backend  # noqa: F401  (loads an optimized BLAS before MLX)
from backend.types import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def _checked(name: str, cast, ok, rule: str):
    """An argparse type: `cast`, then `ok`, else one line with the rule ("must be at least 1 (got 0)")."""
    def parse(v: str):
        x = cast(v)
        if not ok(x):
            raise argparse.ArgumentTypeError(f"{rule} (got {v})")
        return x
    parse.__name__ = name  # what argparse names in "invalid <name> value"
    return parse


_positive_int = _checked("_positive_int", int, lambda n: n >= 1, "must be at least 1")
_fraction = _checked("_fraction", float, lambda f: 0.0 < f < 1.0, "must be between 0 and 1, both excluded")
_strength = _checked("_strength", float, lambda f: 0.0 < f <= 1.0, "must be above 0 and at most 1")
_pixels = _checked("_pixels", int, lambda n: n >= 0, "must be 0 or more")
_seed = _checked("_seed", int, lambda n: 0 <= n < 2**64,
                 "must be a whole number from 0 to 2^64 - 1; leave it out for a random seed")


def cmd_generate(a) -> int:
    import numpy as np
    from backend import GenerationRequest, load_pipeline
    from backend.png import check_output, save_image
    check_output(a.out)  # before any work
    if a.refiner_start is not None and not a.refiner:
        raise UserError("--refiner-start needs --refiner (the model that runs the rest of the steps)")
    from backend.images import ImageInputs
    for given, name in ((a.strength is not None, "--strength"), (a.mask, "--mask")):
        if given and not a.init_image:
            raise UserError(f"{name} needs --init-image (image-to-image)")
    image_args = dict(init_image=a.init_image, strength=a.strength, mask=a.mask, mask_blur=a.mask_blur)
    ImageInputs.from_request(GenerationRequest(prompt=a.prompt, **image_args))  # bad images fail before loading
    latents = None
    if a.latents:
        try:
            latents = np.load(a.latents)
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot read latents {a.latents}: {exc}")
    from backend import lora
    loras = lora.normalize(a.lora)  # missing or non-safetensors files fail before the model loads
    pipe = load_pipeline(a.model, engine=a.backend, precision=a.precision, quantization=a.quantization,
                         compute_units=a.compute_units, attention=a.attention, reduce_memory=a.reduce_memory,
                         t5=not a.no_t5, refiner=a.refiner)
    pipe.allow_large = a.allow_large
    result = pipe.generate(GenerationRequest(
        prompt=a.prompt, negative_prompt=a.negative_prompt, steps=a.steps, guidance=a.guidance,
        scheduler=a.scheduler, width=a.width, height=a.height, seed=a.seed, latents=latents,
        max_sequence_length=a.max_sequence_length, refiner_start=a.refiner_start, loras=loras, **image_args))
    save_image(result.image, a.out, result.parameters)
    for w in result.warnings:
        print(f"warning: {w}", file=sys.stderr)
    if a.json:
        print(json.dumps({"out": a.out, **result.measurements()}))
    else:
        t = result.timings
        print(f"{a.out}: seed {result.seed}, {len(t.steps)} steps in {t.denoise:.2f}s "
              f"({t.steps_per_second:.2f} it/s), total {t.total:.2f}s; {result.engine['reason']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m backend", description="Silicon Diffusion command line")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    g = sub.add_parser("generate", help="text to image")
    g.add_argument("--model", default="tiny-shapes", help="registry name, local folder or Hub id")
    g.add_argument("--prompt", required=True)
    g.add_argument("--negative-prompt", default="")
    g.add_argument("--steps", type=_positive_int)
    g.add_argument("--guidance", type=float)
    g.add_argument("--scheduler")
    g.add_argument("--width", type=int)
    g.add_argument("--height", type=int)
    g.add_argument("--seed", type=_seed)
    g.add_argument("--latents", help="standard-normal NCHW noise (.npy), diffusers' latents= convention")
    g.add_argument("--backend", default="auto", choices=["auto", "mlx", "coreml"])
    g.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="auto: fp16 on a GPU, fp32 on the CPU")
    g.add_argument("--quantization", help="MLX: q8, q6, q4, q3, q2 (Core ML: pick a quantized resources folder)")
    g.add_argument("--compute-units", default="auto", choices=["auto", "ALL", "CPU_AND_NE", "CPU_AND_GPU", "CPU_ONLY"],
                   help="Core ML: auto runs the units the attention variant is made for (CPU_AND_GPU for original, "
                   "CPU_AND_NE for split-einsum), as Apple's apps do")
    g.add_argument("--attention", choices=["original", "split_einsum", "split_einsum_v2"],
                   help="Core ML: the attention variant (default: Apple's choice for this Mac and the compute units)")
    g.add_argument("--reduce-memory", action="store_true",
                   help="load each stage (text encoders, denoiser, VAE) when it runs and release it after: "
                        "a lower peak, a load per stage per image")
    g.add_argument("--no-t5", action="store_true",
                   help="SD3: skip the T5 text encoder (~9 GB less; its tokens are zeros, as without T5)")
    g.add_argument("--max-sequence-length", type=_positive_int,
                   help="SD3: T5 tokens after CLIP's 77 (default 256, or what Core ML packages fix)")
    g.add_argument("--refiner", metavar="MODEL",
                   help="SDXL: a refiner (e.g. sdxl-refiner) that runs the last steps and decodes")
    g.add_argument("--refiner-start", type=_fraction, metavar="F",
                   help="with --refiner: the fraction of the schedule the base runs (default 0.8)")
    g.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="a LoRA (.safetensors, diffusers/PEFT or kohya naming) and its scale (default 1.0); "
                        "repeat for several. MLX only (Core ML: export-coreml --lora)")
    g.add_argument("--init-image", metavar="PATH",
                   help="image to image: start from this picture, resized to the output size (default: its own size)")
    g.add_argument("--strength", type=_strength, metavar="S",
                   help="with --init-image: how much is repainted, in (0, 1] (default 0.8; with --mask 1.0)")
    g.add_argument("--mask", metavar="PATH", help="with --init-image: inpaint where this mask is white (same size)")
    g.add_argument("--mask-blur", type=_pixels, default=0, metavar="PX",
                   help="with --mask: Gaussian blur radius before the mask is binarized (default 0: off)")
    g.add_argument("--allow-large", action="store_true",
                   help="allow sizes beyond twice the model's native size (up to what its denoiser takes)")
    g.add_argument("--out", required=True)
    g.add_argument("--json", action="store_true", help="print one JSON line of measurements")
    g.set_defaults(func=cmd_generate)

    from backend import bench, doctor, quantize
    from backend.engines.coreml import cli as coreml_cli
    for module in (bench, coreml_cli, quantize, doctor):  # each adds its own subcommand
        module.add_command(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from backend import blas
    blas.report_once()  # Linux without an optimized BLAS: one line on stderr, with what it costs
    try:
        return args.func(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
