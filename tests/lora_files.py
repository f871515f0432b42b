"""Random LoRA files for the tiny models, in diffusers/PEFT naming and in kohya naming (SD1 diffusers blocks,
SDXL SGM blocks), written from the diffusers modules' own names and shapes."""
from __future__ import annotations

import re

import numpy as np

UNET_TARGETS = (r"attn[12]\.to_(q|k|v|out\.0)$", r"proj_(in|out)$", r"ff\.net\.(0\.proj|2)$", r"time_emb_proj$",
                r"down_blocks\.0\.resnets\.0\.conv1$", r"downsamplers\.0\.conv$")
TEXT_TARGETS = (r"self_attn\.(q|k|v|out)_proj$", r"mlp\.fc1$")


def targets(module, patterns) -> dict:
    """{module name: weight shape} of the Linear/Conv2d layers matching `patterns`."""
    import torch
    return {name: tuple(m.weight.shape) for name, m in module.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and any(re.search(p, name) for p in patterns)}


def random_layers(shapes: dict, rank: int, seed: int, std: float = 0.15) -> dict:
    """{name: (down (r, in[, kh, kw]), up (out, r[, 1, 1]))}"""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in sorted(shapes.items()):
        conv = len(shape) == 4
        down = rng.standard_normal((rank, shape[1], *shape[2:])) * std
        up = rng.standard_normal((shape[0], rank, *((1, 1) if conv else ()))) * std
        out[name] = (down.astype(np.float32), up.astype(np.float32))
    return out


def te_name(name: str) -> str:
    """A text encoder module name as transformers 4 (and LoRA files) spell it: under `text_model.`."""
    return name if name.startswith("text_model.") else f"text_model.{name}"


def sgm_name(name: str, layers_per_block: int = 2) -> str:
    """A diffusers UNet module name in SGM (original SD / SDXL) block naming, as kohya writes SDXL LoRAs."""
    per = layers_per_block + 1
    m = re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", name)
    if m:
        b, kind, l, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
        rest = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1"}.get(rest, rest)
        return f"input_blocks.{1 + b * per + l}.{0 if kind == 'resnets' else 1}.{rest}"
    m = re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", name)
    if m:
        return f"input_blocks.{(int(m.group(1)) + 1) * per}.0.op"
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", name)
    if m:
        index = {"resnets.0": 0, "attentions.0": 1, "resnets.1": 2}[f"{m.group(1)}.{m.group(2)}"]
        rest = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1"}.get(m.group(3), m.group(3))
        return f"middle_block.{index}.{rest}"
    m = re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", name)
    if m:
        b, kind, l, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
        rest = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1"}.get(rest, rest)
        return f"output_blocks.{b * per + l}.{0 if kind == 'resnets' else 1}.{rest}"
    return name


def write_peft(path, pipe, rank: int, seed: int, alpha=None, text=True) -> dict:
    """diffusers' save_lora_weights layout: `unet.<name>.lora_A.weight` ...; `alpha` goes into each component's
    PEFT adapter metadata (diffusers needs it for every component once one has it)."""
    import torch
    unet = {f"{n}.lora_{ab}.weight": torch.from_numpy(t) for n, (d, u) in
            random_layers(targets(pipe.unet, UNET_TARGETS), rank, seed).items() for ab, t in (("A", d), ("B", u))}
    kwargs = {"unet_lora_layers": unet}

    def metadata(component, layers):
        if alpha is not None:
            from peft import LoraConfig
            config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=sorted({k.rsplit(".lora_", 1)[0] for k in layers}))
            kwargs[f"{component}_lora_adapter_metadata"] = config.to_dict()
    metadata("unet", unet)
    encoders = [("text_encoder", pipe.text_encoder)] + \
        ([("text_encoder_2", pipe.text_encoder_2)] if getattr(pipe, "text_encoder_2", None) is not None else [])
    if text:
        for i, (component, encoder) in enumerate(encoders):
            layers = random_layers(targets(encoder, TEXT_TARGETS), rank, seed + 10 + i)
            kwargs[f"{component}_lora_layers"] = {f"{n}.lora_{ab}.weight": torch.from_numpy(t)
                                                  for n, (d, u) in layers.items() for ab, t in (("A", d), ("B", u))}
            metadata(component, kwargs[f"{component}_lora_layers"])
    type(pipe).save_lora_weights(str(path.parent), weight_name=path.name, **kwargs)
    return kwargs


def write_kohya(path, pipe, rank: int, seed: int, alpha: float, sgm=False, extra=None) -> None:
    """kohya / A1111 naming: lora_unet_<name with _>, lora_te[1|2]_text_model_..., .lora_down/.lora_up/.alpha."""
    from safetensors.numpy import save_file
    tensors = {}

    def add(prefix, name, down, up):
        stem = prefix + name.replace(".", "_")
        tensors[f"{stem}.lora_down.weight"], tensors[f"{stem}.lora_up.weight"] = down, up
        tensors[f"{stem}.alpha"] = np.array(alpha, np.float32)
    for name, (down, up) in random_layers(targets(pipe.unet, UNET_TARGETS), rank, seed).items():
        add("lora_unet_", sgm_name(name) if sgm else name, down, up)
    xl = getattr(pipe, "text_encoder_2", None) is not None
    encoders = [("lora_te1_" if xl else "lora_te_", pipe.text_encoder)] + ([("lora_te2_", pipe.text_encoder_2)] if xl else [])
    for i, (prefix, encoder) in enumerate(encoders):
        for name, (down, up) in random_layers(targets(encoder, TEXT_TARGETS), rank, seed + 10 + i).items():
            add(prefix, te_name(name), down, up)
    tensors.update(extra or {})
    save_file(tensors, str(path))
