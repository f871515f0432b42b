"""Fit a model's own latent -> RGB preview projection and write it to its silicon_diffusion.json.

    python tools/fit_preview_projection.py [--model assets/tiny-shapes] [--n 512] [--write]

The family projections (backend/families.py) are fitted to Stable Diffusion's VAEs; a model with a VAE of its
own (the embedded model) needs its own. This encodes `--n` of the embedded model's training scenes with the
model's VAE encoder (posterior mean, scaled as the denoiser sees latents), fits latents -> the images averaged
over each latent cell by least squares (backend/preview.fit_projection) and prints the fit's RMS error in 8-bit
levels; `--write` stores it as `preview_rgb` in the model folder's silicon_diffusion.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import backend  # noqa: E402,F401  (loads the optimized BLAS before MLX)

from backend.embedded import dataset  # noqa: E402
from backend.pipeline import load_pipeline  # noqa: E402
from backend.preview import fit_projection, project  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="assets/tiny-shapes")
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    pipe = load_pipeline(args.model, engine="mlx", precision="fp32")
    size = pipe.spec.native_size
    images, _ = dataset.make_dataset(args.n, seed=args.seed, resolution=size)
    pixels = images.astype(np.float32) / 127.5 - 1.0
    latents = np.concatenate([pipe._encode_pixels(pixels[i:i + 64].transpose(0, 3, 1, 2))
                              for i in range(0, args.n, 64)])
    fit = fit_projection(latents, pixels, pipe.spec.vae_scale_factor)
    f = pipe.spec.vae_scale_factor
    cells = images.reshape(args.n, size // f, f, size // f, f, 3).mean(axis=(2, 4))
    shown = np.stack([project(z, fit["factors"], fit["bias"]) for z in latents]).astype(np.float32)
    print(json.dumps(fit), f"RMS error {np.sqrt(np.mean((shown - cells) ** 2)):.1f} of 255", sep="\n")
    if args.write:
        path = Path(args.model) / "silicon_diffusion.json"
        settings = json.loads(path.read_text())
        settings["preview_rgb"] = fit
        path.write_text(json.dumps(settings, indent=2) + "\n")
        print(f"written to {path}")


if __name__ == "__main__":
    main()
