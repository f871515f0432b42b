"""The Generate tab's start image, mask and LoRA table: from the widgets' values to a request's fields, and back
from the LoRAs a PNG records."""
from __future__ import annotations

import gradio as gr
import numpy as np
import pandas as pd


def editor_image_and_mask(value, uploaded_mask=None) -> tuple:
    """(start image, mask) from the ImageEditor's value: its background, and a white-on-black mask of what was
    painted over it (an uploaded mask wins). (None, None) when no start image is given."""
    from PIL import Image
    if not value or value.get("background") is None:
        return None, None
    background = _opened(value["background"], "start image").convert("RGB")
    if uploaded_mask is not None:
        return background, _opened(uploaded_mask, "mask").convert("L")
    painted = None
    for layer in value.get("layers") or []:
        alpha = np.asarray(_opened(layer, "painted mask").convert("RGBA").getchannel("A")) > 0
        painted = alpha if painted is None else painted | alpha
    if painted is None or not painted.any():
        return background, None
    return background, Image.fromarray(painted.astype(np.uint8) * 255).resize(background.size, Image.NEAREST)


def _opened(value, what: str):
    """A PIL image from a widget's value: an upload's path is read with backend/images.py's limits (its size and
    pixels checked from the header before decoding), so a bad upload is the app's sentence."""
    from backend.images import load_image
    return value if hasattr(value, "convert") else load_image(value, what)[0]


def image_fields(editor, uploaded_mask, strength, mask_blur, lora_rows) -> dict:
    """The request's start image, mask, strength, feather and LoRAs from the Generate tab's controls."""
    init, mask = editor_image_and_mask(editor, uploaded_mask)
    fields = {"loras": lora_choice(lora_rows)}
    if init is not None:
        fields.update(init_image=init, mask=mask, strength=float(strength), mask_blur=int(mask_blur or 0))
    return fields


def lora_choice(rows) -> list:
    """(file, scale) for every LoRA row with a scale other than 0."""
    values = rows.values.tolist() if hasattr(rows, "values") else list(rows or [])
    chosen = []
    for row in values:
        if len(row) >= 3 and row[0] and row[2] not in (None, "") and float(row[2]) != 0.0:
            chosen.append((str(row[1]), float(row[2])))
    return chosen


def restore_lora_scales(rows, used: list) -> tuple:
    """The LoRA table with the scales a PNG records (matched by file name, then hash), and the names not found."""
    from backend.lora_files import file_sha256
    table = rows.copy() if hasattr(rows, "copy") else pd.DataFrame(rows, columns=["LoRA", "File", "Scale"])
    table["Scale"] = 0.0
    missing = []
    for lora in used:
        hits = [i for i, name in enumerate(table["LoRA"]) if name == lora.get("name")
                and (not lora.get("sha256") or file_sha256(table["File"][i]).startswith(lora["sha256"]))]
        if hits:
            table.loc[hits[0], "Scale"] = float(lora.get("scale", 1.0))
        else:
            missing.append(str(lora.get("name")))
    return table, missing


def lora_label(table) -> str:
    from backend.lora_files import lora_folder
    if len(table) == 0:
        return f"No LoRA files found: put .safetensors LoRAs in {lora_folder()} and look again"
    return "Scale 0 leaves a LoRA off; several may be on at once"


def lora_table(files=None) -> pd.DataFrame:
    from backend.lora_files import find_lora_files
    files = find_lora_files() if files is None else files
    return pd.DataFrame([[f.name, str(f), 0.0] for f in files], columns=["LoRA", "File", "Scale"])


def lora_table_update():
    """The LoRA table looked for again, with its label."""
    table = lora_table()
    return gr.update(value=table, label=lora_label(table))
