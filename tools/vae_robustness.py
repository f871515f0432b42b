"""How much error in its latents a shapes model's VAE tolerates before squares turn into circles.

    python tools/vae_robustness.py assets/tiny-shapes [.cache/train-x/checkpoint ...] [--noise 0 0.1 0.2 0.3]

The UNet never hands the decoder an exact latent. This encodes 60 drawn squares, adds Gaussian noise
scaled to the latents' own spread, decodes, and reads each image back with backend.embedded.analysis:
the mean fill of the bounding box (1.0 drawn) and the share still read as squares (the analysis tells a
square from a circle by the corners of its box). Any folder backend.embedded.model.save_folder wrote works (a model or a
training checkpoint).
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import backend  # noqa: E402,F401  (OpenBLAS before mlx)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from backend.embedded import analysis, dataset  # noqa: E402
from backend.embedded.model import load_folder  # noqa: E402


def squares(n: int = 60, seed: int = 7) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scenes = [dataset.complete(dataset.Scene(shape="square"), rng) for _ in range(n)]
    return np.stack([dataset.render(scene, rng) for scene in scenes])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--noise", nargs="+", type=float, default=[0.0, 0.1, 0.2, 0.3],
                        help="noise standard deviations, relative to the latents' spread")
    args = parser.parse_args(argv)
    images = squares()
    print("| VAE | noise | mean fill | read as square |\n|---|---|---|---|")
    for folder in args.folders:
        vae = load_folder(folder).vae
        mean = np.array(vae.encode(mx.array(images.astype(np.float32) / 127.5 - 1.0))[0])
        for sigma in args.noise:
            noise = np.random.default_rng(1).standard_normal(mean.shape).astype(np.float32)
            decoded = np.array(vae.decode(mx.array(mean + sigma * mean.std() * noise)))
            pixels = (np.clip(decoded / 2 + 0.5, 0, 1) * 255).round().astype(np.uint8)
            readings = [analysis.read_scene(p) for p in pixels]
            fill = np.mean([r.fill for r in readings])
            share = np.mean([r.shape == "square" for r in readings])
            print(f"| {folder} | {sigma:g} | {fill:.3f} | {100 * share:.0f}% |")


if __name__ == "__main__":
    main()
