"""Times one training step of the embedded model's text encoder + UNet (batch 32) for a UNet width and text context.

    python tools/bench_train_step.py --widths 32,64,64,64 64,64,64,64 --context 77 16

Synthetic batches (random latents, targets and token ids), compiled as backend/embedded/train.py compiles
its step; 3 warm-up steps, then the mean of --steps.
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import backend  # noqa: E402,F401  (OpenBLAS before mlx)
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

from backend.embedded import model as embedded, train  # noqa: E402


def step_seconds(widths: list[int], context: int, steps: int, batch: int = 32) -> tuple[float, int]:
    mx.random.seed(0)
    parts = embedded.Parts(text_config={**embedded.text_encoder_config(), "max_position_embeddings": context},
                           unet_config={**embedded.UNET_CONFIG, "block_out_channels": widths})
    model = train.Denoiser(parts)
    optimizer = optim.AdamW(1e-4)
    loss_and_grad = nn.value_and_grad(model, train.denoise_loss)
    state = [model.state, optimizer.state]

    def step(*args):
        loss, grads = loss_and_grad(model, *args)
        optimizer.update(model, grads)
        return loss

    step = mx.compile(step, inputs=state, outputs=state)
    rng = np.random.default_rng(0)
    latents = (batch, 16, 16, 4)
    args = [mx.array(rng.standard_normal(latents).astype(np.float32)),
            mx.array(rng.integers(0, 1000, batch).astype(np.float32)),
            mx.array(rng.integers(1, 30, (batch, context)).astype(np.int32)),
            mx.array(rng.standard_normal(latents).astype(np.float32)), mx.ones((batch, 16, 16, 1))]
    for i in range(3 + steps):
        if i == 3:
            start = time.perf_counter()
        step(*args)
        mx.eval(state)
    return (time.perf_counter() - start) / steps, sum(v.size for _, v in tree_flatten(parts.unet.parameters()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", nargs="+", default=["32,64,64,64"], help="block_out_channels, comma-separated")
    parser.add_argument("--context", nargs="+", type=int, default=[77], help="text positions")
    parser.add_argument("--steps", type=int, default=15)
    args = parser.parse_args()
    print("| UNet widths | context | UNet params | ms/step | steps/s |\n|---|---|---|---|---|")
    for widths in args.widths:
        for context in args.context:
            seconds, params = step_seconds([int(w) for w in widths.split(",")], context, args.steps)
            print(f"| {widths} | {context} | {params / 1e6:.2f} M | {seconds * 1000:.0f} | {1 / seconds:.2f} |", flush=True)


if __name__ == "__main__":
    main()
