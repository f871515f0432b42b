"""Trains the embedded tiny-shapes model with MLX: the VAE first, then the text encoder and UNet together.

    python -m backend.train --work .cache/train-tiny-shapes --out assets/tiny-shapes

Everything is a function of the seed: the data set (backend/embedded/dataset.py), the initial weights,
and each step's batch, noise and caption choices (drawn from (seed, phase, step)), so a run stopped
anywhere and resumed from its last checkpoint continues exactly as if it had not stopped.

- VAE: reconstruction (MSE + L1) + a small KL term, on crops; then the whole data set is encoded once and the latent
  scaling factor is set so scaled latents have unit variance, as Stable Diffusion's 0.18215 does.
- UNet + text encoder: v-prediction (as SD 2.x) on SD's scaled-linear 1000-step schedule, ~10% empty
  captions (classifier-free guidance), an exponential moving average of the weights (what is saved).
  Why v and not epsilon: near t = 1000 the noisy latent is almost all noise, so an epsilon target is
  almost the input itself and its loss hardly depends on the picture; the colors and layout that the
  caption decides are set at those steps, and an epsilon model never learned to follow the caption
  there (measured: background color right 3% of the time after 1000 steps). A v target at high noise
  is the clean latent itself. Latent cells that hold part of the object weigh `object_weight` times more.
- Zero terminal SNR (the last timestep is pure noise) and trailing timesteps at sampling: with SD's own
  schedule the noisiest step still shows the layout faintly, and the model learned to take the object's
  place from the starting noise instead of from the caption.
Checkpoints go to `--work` (a diffusers folder + optimizer state + progress); `--out` gets the final
folder with fp16 weights. Resuming with a larger `--unet-steps` continues a run past its planned end (the
learning rate's cosine then stretches to the new end); every other setting must stay as it was.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import backend  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from tqdm import tqdm

from backend.embedded import dataset
from backend.embedded.model import RESOLUTION, SCHEDULER_CONFIG, TEXT_LENGTH, Parts, load_folder, save_folder
from backend.schedulers.tables import cumulative_alphas
from backend.tokenizer import CLIPTokenizer
from backend.vocab import write_tokenizer_folder


@dataclass
class Settings:
    seed: int = 0
    examples: int = 10000          # rendered once; each step re-draws which caption parts are said
    vae_steps: int = 2000
    vae_batch: int = 16
    vae_crop: int = 32             # the VAE has no attention: it trains on crops, 4x cheaper than whole images
    vae_lr: float = 5e-4
    object_weight: float = 4.0     # loss weight of object pixels (VAE) and latent cells (UNet); background: 1
    vae_warmup: int = 50
    kl_weight: float = 1e-6        # per latent element against per-pixel errors; SD's is smaller still
    latent_noise: float = 0.0      # noise added to the VAE's latents in training, relative to their spread
    unet_steps: int = 6000
    unet_batch: int = 32
    unet_lr: float = 8e-4
    warmup: int = 200
    caption_keep: float = 0.85     # probability that each part of the caption is said
    empty_caption: float = 0.1     # probability of an empty caption (unconditional)
    ema_decay: float = 0.999
    # Extra share of timesteps drawn from the noisier half; at 0.5 (the previous weights) squares came out rounder.
    high_noise_share: float = 0.0
    checkpoint_every: int = 250


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------
class ShapeData:
    """The rendered training set: uint8 images (N, 64, 64, 3) and the full scene of each."""

    def __init__(self, settings: Settings):
        self.images = np.empty((settings.examples, RESOLUTION, RESOLUTION, 3), np.uint8)
        self.scenes = []
        for i in tqdm(range(settings.examples), desc="render data", leave=False):
            _, self.images[i], scene = dataset.sample(i, settings.seed, RESOLUTION)
            self.scenes.append(scene)
        # The object's pixels: whatever differs from the corner (always background; see dataset.OFFSET).
        self.objects = np.abs(self.images.astype(np.int16) - self.images[:, :1, :1]).max(-1) > 16
        self.settings = settings

    def pixels(self, indices) -> np.ndarray:
        """Images in [-1, 1], float32 NHWC."""
        return self.images[indices].astype(np.float32) / 127.5 - 1.0

    def latent_objects(self, indices, factor: int) -> np.ndarray:
        """(B, h, w, 1) float: latent cells that hold part of the object."""
        masks = self.objects[indices]
        b, h, w = masks.shape
        cells = masks.reshape(b, h // factor, factor, w // factor, factor).max(axis=(2, 4))
        return cells[..., None].astype(np.float32)

    def crops(self, indices: np.ndarray, size: int, rng: np.random.Generator, align: int = 4):
        """(images, object masks): size x size crops around each object, at offsets on the latent grid."""
        images, masks = [], []
        for i in indices:
            ys, xs = np.nonzero(self.objects[i])
            center = np.array([ys.mean(), xs.mean()]) if len(ys) else np.full(2, RESOLUTION / 2)
            corner = center - size / 2 + rng.uniform(-size / 4, size / 4, 2)
            y, x = (np.clip(np.round(corner / align), 0, (RESOLUTION - size) // align) * align).astype(int)
            images.append(self.pixels(i)[y:y + size, x:x + size])
            masks.append(self.objects[i, y:y + size, x:x + size])
        return np.stack(images), np.stack(masks)

    def captions(self, indices: np.ndarray, rng: np.random.Generator) -> list[str]:
        out = []
        for i in indices:
            if rng.random() < self.settings.empty_caption:
                out.append("")
                continue
            said = {k: v for k, v in self.scenes[i].said().items() if rng.random() < self.settings.caption_keep}
            out.append(dataset.Scene(**said).caption())
        return out


def step_rng(seed: int, phase: int, step: int) -> np.random.Generator:
    return np.random.default_rng([seed, phase, step])


def lr_schedule(peak: float, warmup: int, total: int):
    """Linear warm-up, then cosine decay to 5% of the peak."""
    return optim.join_schedules([optim.linear_schedule(peak * 0.01, peak, warmup),
                                 optim.cosine_decay(peak, total - warmup, peak * 0.05)], [warmup])


def alphas_cumprod(config: dict = SCHEDULER_CONFIG) -> np.ndarray:
    """The noise table the shipped scheduler samples with (zero terminal SNR: the last step is pure noise)."""
    return cumulative_alphas(config, zero_snr_floor=False).astype(np.float64)


def fresh_parts(seed: int) -> Parts:
    """Untrained modules, with the text encoder's token embeddings scaled up to the residual stream's size.

    With MLX's default initialization a token's embedding is ~1/10 of what the layers add on top, and
    causal attention averages earlier tokens in, so late caption words ("... at the top on a blue
    background") barely changed the encoder's output and the UNet never learned them (measured: "top"
    vs "bottom" changed the output by 0.2% after training). Unit-variance embeddings keep each word's
    identity dominant at its position from the first step.
    """
    mx.random.seed(seed)
    parts = Parts()
    embedding = parts.text_encoder.text_model.embeddings.token_embedding
    embedding.weight = mx.random.normal(embedding.weight.shape)
    return parts


# ------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------
class Checkpoints:
    """work/checkpoint (diffusers folder, fp32), work/optimizer.safetensors, work/progress.json."""

    def __init__(self, work: Path):
        self.work = Path(work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.progress_file = self.work / "progress.json"

    def progress(self) -> dict:
        return json.loads(self.progress_file.read_text()) if self.progress_file.exists() else {}

    def save(self, parts: Parts, optimizer, ema: dict | None, progress: dict) -> None:
        save_folder(parts, self.work / "checkpoint")
        state = dict(tree_flatten(optimizer.state))
        if ema is not None:
            state.update({f"ema.{k}": v for k, v in ema.items()})
        mx.save_safetensors(str(self.work / "optimizer.safetensors"), state)
        tmp = self.progress_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(progress, indent=1))
        tmp.rename(self.progress_file)

    def restore(self, optimizer) -> tuple[Parts, dict | None]:
        parts = load_folder(self.work / "checkpoint")
        state = mx.load(str(self.work / "optimizer.safetensors"))
        ema = {k[4:]: v for k, v in state.items() if k.startswith("ema.")}
        optimizer.state = tree_unflatten([(k, v) for k, v in state.items() if not k.startswith("ema.")])
        return parts, (ema or None)


# ------------------------------------------------------------------------------------------------
# Phase 1: the VAE
# ------------------------------------------------------------------------------------------------
def vae_loss(vae, images, weights, noise, kl_weight, latent_noise=0.0, extra_noise=None):
    """Weighted MSE + L1 (object pixels count more than the plain background) + KL.

    With `latent_noise` > 0, `extra_noise` times that much of the latents' spread is added before decoding:
    the decoder must draw the right picture from a latent that is slightly off, as the UNet's always is,
    so the encoder keeps details like a square's corners in large differences (tools/vae_robustness.py
    measures it). Off by default: the shipped weights were trained without it; see the README.
    """
    mean, logvar = vae.encode(images)
    latents = mean + mx.exp(0.5 * logvar) * noise
    if latent_noise > 0:
        latents = latents + latent_noise * mx.stop_gradient(mx.std(mean)) * extra_noise
    error = vae.decode(latents) - images
    mse = mx.mean(error ** 2)
    kl = 0.5 * mx.mean(mean ** 2 + mx.exp(logvar) - 1.0 - logvar)
    return mx.mean(weights * (error ** 2 + mx.abs(error))) + kl_weight * kl, mse


def train_vae(parts: Parts, data: ShapeData, s: Settings, ckpt: Checkpoints, start: int, optimizer) -> None:
    vae = parts.vae
    loss_and_grad = nn.value_and_grad(vae, vae_loss)
    state = [vae.state, optimizer.state]

    def step(images, weights, noise, extra_noise):
        (loss, mse), grads = loss_and_grad(vae, images, weights, noise, s.kl_weight, s.latent_noise, extra_noise)
        optimizer.update(vae, optim.clip_grad_norm(grads, 1.0)[0])
        return loss, mse

    step = mx.compile(step, inputs=state, outputs=state)
    latent = s.vae_crop // 4
    bar = tqdm(range(start, s.vae_steps), initial=start, total=s.vae_steps, desc="vae")
    for i in bar:
        rng = step_rng(s.seed, 1, i)
        images, objects = data.crops(rng.integers(0, len(data.images), s.vae_batch), s.vae_crop, rng)
        weights = 1.0 + (s.object_weight - 1.0) * objects[..., None].astype(np.float32)
        noise = rng.standard_normal((s.vae_batch, latent, latent, 4)).astype(np.float32)
        extra = rng.standard_normal(noise.shape).astype(np.float32) if s.latent_noise > 0 else np.zeros_like(noise)
        loss, mse = step(mx.array(images), mx.array(weights), mx.array(noise), mx.array(extra))
        mx.eval(state)
        bar.set_postfix(loss=f"{loss.item():.4f}", mse=f"{mse.item():.4f}")
        if (i + 1) % s.checkpoint_every == 0 or i + 1 == s.vae_steps:
            ckpt.save(parts, optimizer, None, {"phase": "vae", "step": i + 1, "settings": asdict(s)})


def encode_dataset(parts: Parts, data: ShapeData, batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Latent means and standard deviations of every training image (NHWC)."""
    means, stds = [], []
    for i in tqdm(range(0, len(data.images), batch), desc="encode", leave=False):
        mean, logvar = parts.vae.encode(mx.array(data.pixels(slice(i, i + batch))))
        std = mx.exp(0.5 * logvar)
        mx.eval(mean, std)
        means.append(np.array(mean))
        stds.append(np.array(std))
    return np.concatenate(means), np.concatenate(stds)


# ------------------------------------------------------------------------------------------------
# Phase 2: text encoder + UNet
# ------------------------------------------------------------------------------------------------
class Denoiser(nn.Module):
    """Text encoder and UNet as one trainable module."""

    def __init__(self, parts: Parts):
        super().__init__()
        self.text_encoder = parts.text_encoder
        self.unet = parts.unet

    def __call__(self, noisy, timesteps, input_ids):
        hidden = self.text_encoder(input_ids).last_hidden_state
        return self.unet(noisy, timesteps, hidden)


def denoise_loss(model, noisy, timesteps, input_ids, target, weights):
    return mx.mean(weights * (model(noisy, timesteps, input_ids) - target) ** 2)


def train_denoiser(parts: Parts, data: ShapeData, latents: tuple, s: Settings, ckpt: Checkpoints, start: int,
                   optimizer, ema: dict | None, tokenizer: CLIPTokenizer) -> dict:
    model = Denoiser(parts)
    if ema is None:
        ema = dict(tree_flatten(model.parameters()))
    loss_and_grad = nn.value_and_grad(model, denoise_loss)
    state = [model.state, optimizer.state]

    def step(noisy, timesteps, ids, target, weights):
        loss, grads = loss_and_grad(model, noisy, timesteps, ids, target, weights)
        optimizer.update(model, grads)
        return loss

    step = mx.compile(step, inputs=state, outputs=state)
    abar = alphas_cumprod()
    means, stds = latents
    scale = parts.vae_config["scaling_factor"]
    bar = tqdm(range(start, s.unet_steps), initial=start, total=s.unet_steps, desc="unet")
    for i in bar:
        rng = step_rng(s.seed, 2, i)
        idx = rng.integers(0, len(means), s.unet_batch)
        z = (means[idx] + stds[idx] * rng.standard_normal(means[idx].shape).astype(np.float32)) * scale
        t = rng.integers(0, len(abar), s.unet_batch)
        high = rng.random(s.unet_batch) < s.high_noise_share
        t[high] = rng.integers(len(abar) // 2, len(abar), int(high.sum()))
        noise = rng.standard_normal(z.shape).astype(np.float32)
        a = abar[t].astype(np.float32)[:, None, None, None]
        noisy = np.sqrt(a) * z + np.sqrt(1 - a) * noise
        velocity = np.sqrt(a) * noise - np.sqrt(1 - a) * z
        ids = tokenizer.batch(data.captions(idx, rng))
        weights = 1.0 + (s.object_weight - 1.0) * data.latent_objects(idx, RESOLUTION // z.shape[1])
        loss = step(mx.array(noisy), mx.array(t.astype(np.float32)), mx.array(ids), mx.array(velocity),
                    mx.array(weights))
        decay = min(s.ema_decay, (1 + i) / (10 + i))
        params = dict(tree_flatten(model.parameters()))
        ema = {k: decay * v + (1 - decay) * params[k] for k, v in ema.items()}
        mx.eval(state, ema)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (i + 1) % s.checkpoint_every == 0 or i + 1 == s.unet_steps:
            ckpt.save(parts, optimizer, ema, {"phase": "unet", "step": i + 1, "settings": asdict(s)})
    model.update(tree_unflatten(list(ema.items())))
    return ema


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------
# Settings that only matter once the UNet phase has begun, and one that never changes the result.
_UNET_SETTINGS = {"unet_steps", "unet_batch", "unet_lr", "warmup", "caption_keep", "empty_caption", "ema_decay",
                  "high_noise_share"}
_IRRELEVANT = {"checkpoint_every"}


def _changed_settings(progress: dict, s: Settings) -> list[str]:
    """The settings a resumed run may not change: those of the phases already (partly) done."""
    saved = progress.get("settings")
    if not saved:
        return []
    ignored = _IRRELEVANT | (_UNET_SETTINGS if progress.get("phase") == "vae" else set())
    if progress.get("phase") == "unet" and s.unet_steps >= progress.get("step", 0):
        ignored = ignored | {"unet_steps"}  # continuing: the cosine schedule stretches to the new end
    return sorted(k for k, v in asdict(s).items() if k not in ignored and saved.get(k) != v)


def run(s: Settings, work: Path, out: Path) -> Path:
    started = time.time()
    ckpt = Checkpoints(work)
    progress = ckpt.progress()
    changed = _changed_settings(progress, s)
    if changed:
        raise SystemExit(f"{work} holds a run with other settings ({', '.join(changed)}); "
                         "use another --work folder or the same options")
    data = ShapeData(s)

    vae_opt = optim.AdamW(lr_schedule(s.vae_lr, s.vae_warmup, s.vae_steps), weight_decay=0.0)
    unet_opt = optim.AdamW(lr_schedule(s.unet_lr, s.warmup, s.unet_steps), weight_decay=0.01)
    phase, done, ema = progress.get("phase", "vae"), progress.get("step", 0), None
    if phase == "vae":
        parts = ckpt.restore(vae_opt)[0] if progress else fresh_parts(s.seed)
        train_vae(parts, data, s, ckpt, done, vae_opt)
        done = 0
    else:
        parts, ema = ckpt.restore(unet_opt)

    latents_file = work / "latents.npz"
    if latents_file.exists():
        cached = np.load(latents_file)
        latents = (cached["means"], cached["stds"])
    else:
        latents = encode_dataset(parts, data)
        np.savez(latents_file, means=latents[0], stds=latents[1])
    sampled = latents[0] + latents[1] * np.random.default_rng(s.seed).standard_normal(latents[0].shape)
    parts.vae_config["scaling_factor"] = round(float(1.0 / sampled.std()), 5)

    tokenizer = CLIPTokenizer.from_folder(write_tokenizer_folder(work / "tokenizer", dataset.vocabulary(),
                                                                max_length=TEXT_LENGTH))
    train_denoiser(parts, data, latents, s, ckpt, done, unet_opt, ema, tokenizer)
    save_folder(parts, out, dtype=mx.float16)
    print(f"saved {out} after {(time.time() - started) / 60:.1f} minutes")
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m backend.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path(".cache/train-tiny-shapes"),
                        help="checkpoints and progress (resumed when present)")
    parser.add_argument("--out", type=Path, default=Path("assets/tiny-shapes"), help="the finished model folder")
    for name, default in asdict(Settings()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)
    args = vars(parser.parse_args(argv))
    work, out = args.pop("work"), args.pop("out")
    run(Settings(**args), work, out)


if __name__ == "__main__":
    main()
