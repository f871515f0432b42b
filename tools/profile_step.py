"""Where one denoiser step's time goes, by layer kind: this project's MLX engine beside diffusers, in one process.

    python tools/profile_step.py --model sd3-medium [--size 512] [--layers 6] [--rounds 4]
    python tools/profile_step.py --model sd-1.5          # or sdxl (1024 px by default)

Both engines build the model from configs/reference/ with random weights and take a guided step (batch 2,
77 text tokens; SD3: + 77 T5 slots, as `python -m backend bench`), in fp32 on the CPU, taking turns, one step
each, `--rounds` times (the order swapped every round, so a slow spell of a shared machine falls on both). Each
step is split into layer kinds by timing the entry points of each kind; a kind's time leaves out the kinds timed
inside it, and `other` is the rest of the step (residual adds, reshapes, embeddings, Python). Medians per kind.

- products: MLX's Linear calls and the CPU kernels' products (cpu_rowwise.products / project, bias and gated
  residual included); torch's nn.Linear.
- attention: layers.attention (the CPU kernel in cpu_attention / cpu_native); torch's scaled_dot_product_attention.
- conv: layers.convolve and the Conv2d layers (Winograd, direct, the time-embedding bias and skip connection
  folded in); torch's nn.Conv2d, except its 1x1 ones (SD 1.x's proj_in / proj_out, the resnets' shortcuts),
  which are products on both sides (Linear layers in this engine).
- norm: LayerNorm / GroupNorm kernels (with the modulation of SD3's AdaLN, and the SiLU a GroupNorm is fused
  with); torch's norms and diffusers' AdaLayerNorm* modules (their modulation; their Linear is a product).
- activation: GELU / GEGLU / SiLU kernels; torch's F.gelu, nn.SiLU, nn.GELU.

An MLX call's pending inputs are evaluated before its clock starts and its outputs before the clock stops, so
lazy work is charged where it is made. In one process, torch's BLAS calls reach the oneMKL the project loaded
first (its exported symbols take precedence over torch's static copy), so the products compare the two
engines' use of one BLAS kernel, not two BLAS builds. Prints the CPU and BLAS first.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import backend  # noqa: E402,F401  (the optimized BLAS before MLX and torch)
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402

from backend import blas  # noqa: E402
from backend.bench import CONFIGS, cpu_model  # noqa: E402

KINDS = ("products", "attention", "conv", "norm", "activation")
DEFAULT_SIZE = {"sd-1.5": 512, "sdxl": 1024, "sd3-medium": 512}
SD3_TOKENS = 154


class KindClock:
    """Exclusive wall time per kind for the calling (main) thread: a kind's call timed inside another's is taken
    out of the outer one's."""

    def __init__(self):
        self.totals = defaultdict(float)
        self._open = []
        self._main = threading.main_thread().ident

    def here(self) -> bool:
        return threading.get_ident() == self._main

    def enter(self, kind: str) -> None:
        self._open.append([kind, time.perf_counter(), 0.0])

    def leave(self) -> None:
        kind, start, inner = self._open.pop()
        spent = time.perf_counter() - start
        self.totals[kind] += spent - inner
        if self._open:
            self._open[-1][2] += spent

    def take(self) -> dict:
        totals, self.totals = dict(self.totals), defaultdict(float)
        return totals


CLOCK = KindClock()


def _mlx_arrays(values) -> list:
    found = []
    for v in values:
        if isinstance(v, mx.array):
            found.append(v)
        elif isinstance(v, (list, tuple)):
            found.extend(_mlx_arrays(v))
    return found


def _timed_mlx(kind: str, fn):
    def call(*args, **kwargs):
        if not CLOCK.here():
            return fn(*args, **kwargs)
        mx.eval(_mlx_arrays(list(args) + list(kwargs.values())))
        CLOCK.enter(kind)
        try:
            out = fn(*args, **kwargs)
            mx.eval(_mlx_arrays([out]))
        finally:
            CLOCK.leave()
        return out
    return call


def instrument_mlx() -> None:
    from backend.engines.mlx import cpu_rowwise, layers, mmdit, quantize
    functions = {
        "products": [(cpu_rowwise, "products"), (cpu_rowwise, "project"), (layers, "bias_free")],
        "attention": [(layers, "attention"), (mmdit, "attention")],
        "conv": [(layers, "convolve"), (layers, "winograd_convolve")],
        "norm": [(cpu_rowwise, n) for n in ("layer_norm", "group_norm", "affine_silu", "affine_silu_into")],
        "activation": [(cpu_rowwise, n) for n in ("gelu", "gelu_tanh", "geglu", "quick_gelu")]
        + [(layers, n) for n in ("silu", "gelu", "gelu_tanh")] + [(mmdit, "silu")],
    }
    methods = {"products": [nn.Linear, layers.Linear, quantize.QuantizedLinear],  # layers.Linear: its own CPU call
               "conv": [layers.Conv2d, quantize.QuantizedConv2d],
               "norm": [layers.GroupNorm, layers.LayerNorm]}
    for kind, places in functions.items():  # a name gone from the engine fails here, not as a quietly smaller row
        for module, name in places:
            setattr(module, name, _timed_mlx(kind, getattr(module, name)))
    for kind, classes in methods.items():
        for cls in classes:
            cls.__call__ = _timed_mlx(kind, cls.__dict__["__call__"])


def instrument_torch(model) -> None:
    import torch
    import torch.nn.functional as F
    modules = {"products": (torch.nn.Linear,), "conv": (torch.nn.Conv2d,),
               "norm": (torch.nn.LayerNorm, torch.nn.GroupNorm), "activation": (torch.nn.SiLU, torch.nn.GELU)}

    def kind_of(module):
        if type(module).__name__.startswith(("AdaLayerNorm", "SD35AdaLayerNorm", "RMSNorm")):
            return "norm"
        if isinstance(module, torch.nn.Conv2d) and tuple(module.kernel_size) == (1, 1):
            return "products"  # SD 1.x's proj_in / proj_out and the resnets' shortcuts: Linear layers in MLX
        return next((k for k, classes in modules.items() if isinstance(module, classes)), None)

    for module in model.modules():
        kind = kind_of(module)
        if kind:
            module.register_forward_pre_hook(lambda m, i, kind=kind: CLOCK.enter(kind) if CLOCK.here() else None)
            module.register_forward_hook(lambda m, i, o: CLOCK.leave() if CLOCK.here() else None)

    def timed(kind, fn):
        def call(*args, **kwargs):
            if not CLOCK.here():
                return fn(*args, **kwargs)
            CLOCK.enter(kind)
            try:
                return fn(*args, **kwargs)
            finally:
                CLOCK.leave()
        return call
    F.scaled_dot_product_attention = timed("attention", F.scaled_dot_product_attention)
    F.gelu = timed("activation", F.gelu)
    F.silu = timed("activation", F.silu)


def _config(model: str, part: str) -> dict:
    return json.loads((CONFIGS / model / part / "config.json").read_text())


def mlx_step(model: str, size: int, layers_n: int | None):
    from backend.engines.mlx import cpu_kernels
    latent = size // 8
    if model == "sd3-medium":
        from backend.engines.mlx.mmdit import SD3Config, SD3Transformer2DModel
        cfg = _config(model, "transformer") | ({"num_layers": layers_n} if layers_n else {})
        net = SD3Transformer2DModel(SD3Config.from_dict(cfg))
        inputs = (mx.random.normal((2, latent, latent, 16)), mx.array([750.0, 750.0]),
                  mx.random.normal((2, SD3_TOKENS, 4096)), mx.random.normal((2, 2048)))
        extra = {}
    else:
        from backend.engines.mlx.unet import UNet2DConditionModel, UNetConfig
        cfg = _config(model, "unet")
        net = UNet2DConditionModel(UNetConfig.from_dict(cfg))
        inputs = (mx.random.normal((2, latent, latent, 4)), mx.array([500.0, 500.0]),
                  mx.random.normal((2, 77, cfg["cross_attention_dim"])))
        extra = dict(text_embeds=mx.zeros((2, 1280)), time_ids=mx.array([[size, size, 0, 0, size, size]] * 2,
                     dtype=mx.float32)) if cfg.get("addition_embed_type") == "text_time" else {}
    mx.eval(net.parameters())

    def step():
        with cpu_kernels.eager_chunks():  # as the engine runs a step
            mx.eval(net(*inputs, **extra))
    return step


def torch_step(model: str, size: int, layers_n: int | None):
    import torch
    torch.set_grad_enabled(False)
    latent = size // 8
    if model == "sd3-medium":
        from diffusers import SD3Transformer2DModel
        cfg = {k: v for k, v in _config(model, "transformer").items() if not k.startswith("_")}
        net = SD3Transformer2DModel(**cfg | ({"num_layers": layers_n} if layers_n else {})).eval()
        x, t = torch.randn(2, 16, latent, latent), torch.tensor([750.0, 750.0])
        ctx, pooled = torch.randn(2, SD3_TOKENS, 4096), torch.randn(2, 2048)

        def call():
            net(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t)
    else:
        from diffusers import UNet2DConditionModel
        cfg = _config(model, "unet")
        net = UNet2DConditionModel.from_config(cfg).eval()
        x, t = torch.randn(2, 4, latent, latent), torch.tensor([500.0, 500.0])
        ctx = torch.randn(2, 77, cfg["cross_attention_dim"])
        time_ids = torch.tensor([[size, size, 0, 0, size, size]] * 2, dtype=torch.float32)
        extra = {"added_cond_kwargs": {"text_embeds": torch.zeros(2, 1280), "time_ids": time_ids}} \
            if cfg.get("addition_embed_type") == "text_time" else {}

        def call():
            net(x, t, ctx, **extra)
    instrument_torch(net)
    return call


def profile(steps: dict, rounds: int) -> dict:
    """{engine: {"step": [seconds], kind: [seconds]}} over `rounds` turns, after one untimed step each."""
    for step in steps.values():
        step()
    CLOCK.take()
    runs = {engine: defaultdict(list) for engine in steps}
    order = list(steps)
    for r in range(rounds):
        for engine in order if r % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            steps[engine]()
            total = time.perf_counter() - start
            kinds = CLOCK.take()
            runs[engine]["step"].append(total)
            for kind in KINDS:
                runs[engine][kind].append(kinds.get(kind, 0.0))
            runs[engine]["other"].append(total - sum(kinds.values()))
    return runs


def table(runs: dict) -> str:
    engines = list(runs)
    lines = ["| kind | " + " | ".join(engines) + " | MLX / diffusers |", "|---|" + "---|" * (len(engines) + 1)]
    for kind in KINDS + ("other", "step"):
        medians = [statistics.median(runs[e][kind]) for e in engines]
        ratio = f"{medians[0] / medians[1]:.2f}x" if min(medians) > 0.005 else "-"  # not for a kind one lacks
        lines.append(f"| {kind} | " + " | ".join(f"{m:.3f} s" for m in medians) + f" | {ratio} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(DEFAULT_SIZE), default="sd3-medium")
    parser.add_argument("--size", type=int, default=None, help="image size in pixels (default: the model's)")
    parser.add_argument("--layers", type=int, default=None, help="SD3: joint blocks to build (default: all 24)")
    parser.add_argument("--rounds", type=int, default=4, help="steps per engine, taking turns")
    a = parser.parse_args(argv)
    if a.layers is not None and a.model != "sd3-medium":
        parser.error("--layers applies to sd3-medium only")
    size = a.size or DEFAULT_SIZE[a.model]
    print(f"CPU: {cpu_model()}; BLAS: {blas.describe()}; MLX device: {mx.default_device()}")
    print(f"{a.model} {size}px, batch 2, fp32" + (f", {a.layers} joint blocks" if a.layers else "")
          + f"; medians of {a.rounds} steps per engine, taking turns")
    instrument_mlx()
    runs = profile({"MLX": mlx_step(a.model, size, a.layers), "diffusers": torch_step(a.model, size, a.layers)},
                   a.rounds)
    print(table(runs))
    print("steps: " + "; ".join(f"{e} " + " ".join(f"{s:.2f}" for s in r["step"]) for e, r in runs.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
