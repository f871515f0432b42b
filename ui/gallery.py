"""The Generate tab's gallery of the images made here: one thumbnail per image (a batch gives one per image, each
with its own seed), a click shows the image and its settings, and "Use these settings" puts them back in the
controls. The list of images is kept in the browser (gr.BrowserState, encrypted with a key kept in the app's home
folder), so the gallery survives a page reload and a server restart; the paths coming back from the browser are
trusted only when they name a PNG of this app's outputs folder that carries its parameters.
"""
from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path
from typing import Optional

import gradio as gr

from backend.png import read_parameters
from backend.session import home
from ui import present
from ui.common import PRIVATE, AppBase

HISTORY_SIZE = 48

#: a gallery thumbnail's whole caption as its tooltip (the grid shows one line of it: CSS .sd-thumbs)
TOOLTIPS = """<script>
(() => {
  const titles = () => document.querySelectorAll(".sd-thumbs .thumbnail-item").forEach((b) => {
    const text = (b.querySelector(".caption-label") || {}).textContent || "";
    if (text && b.title !== text) b.title = text;
  });
  let pending = false;
  new MutationObserver(() => {
    if (!pending) { pending = true; requestAnimationFrame(() => { pending = false; titles(); }); }
  }).observe(document.documentElement, {childList: true, subtree: true});
})();
</script>"""

#: thumbnails with their caption under the picture, not over it; the clicked image's settings panel
CSS = """
.sd-thumbs .thumbnail-item {aspect-ratio:auto; display:flex; flex-direction:column; height:auto;}
.sd-thumbs .thumbnail-item img {flex:none; width:100%; aspect-ratio:1; height:auto; object-fit:contain;}
.sd-thumbs .caption-label {position:static; max-width:100%; width:100%; box-sizing:border-box; border:none;
  border-radius:0; background:transparent; padding:2px 4px; font-size:.72rem; opacity:.85;}
.sd-thumbs .thumbnail-lg:hover .caption-label {opacity:1;}
.sd-picked {font-size:.8rem; line-height:1.35;}
.sd-picked .prompt {margin:0 0 6px; font-weight:600; display:-webkit-box; -webkit-line-clamp:3;
  -webkit-box-orient:vertical; overflow:hidden;}
.sd-picked dl {display:grid; grid-template-columns:auto 1fr; gap:1px 10px; margin:0;}
.sd-picked dt {opacity:.65;} .sd-picked dd {margin:0; overflow:hidden; text-overflow:ellipsis; white-space:nowrap;}
"""


def caption(params: dict) -> str:
    """A thumbnail's caption: the seed first (what tells a batch's images apart), then the prompt and settings.
    The grid shows its start; the whole of it is the thumbnail's tooltip (present.HEAD)."""
    size = f"{params.get('width')}×{params.get('height')}"
    return (f"seed {params.get('seed')} · {params.get('prompt', '')} · {params.get('steps')} steps · "
            f"{params.get('scheduler')} · {size} · {params.get('model')}")


def item(path, params: dict) -> dict:
    return {"path": str(path), "caption": caption(params)}


def gallery_value(history: list) -> list:
    return [(h["path"], h["caption"]) for h in history or []]


def browser_state(home: Path, outputs: Path) -> gr.BrowserState:
    """The browser's copy of the gallery (a list of paths). Its key is kept in `home`, so that the stored value
    still decrypts after a restart; the storage key names the outputs folder, so two apps never read each other's."""
    key_file = Path(home) / "browser-state.key"
    try:
        secret = key_file.read_text().strip()
    except OSError:
        secret = ""
    if len(secret) < 16:
        secret = secrets.token_urlsafe(24)
        try:
            key_file.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secret)
        except OSError:
            pass  # then the gallery lasts as long as this server
    tag = hashlib.sha256(f"{secret}\0{Path(outputs).resolve()}".encode()).hexdigest()[:12]
    return gr.BrowserState([], storage_key=f"silicon-diffusion-gallery-{tag}", secret=secret)


def trusted_items(paths, outputs: Path) -> list:
    """The gallery items of `paths` (sent back by a browser) that are PNGs of `outputs` with parameters; the rest
    is dropped without a word (a file removed since, or a value that was never the app's)."""
    folder = Path(outputs).resolve()
    items = []
    for path in (paths if isinstance(paths, list) else [])[:HISTORY_SIZE]:
        if not isinstance(path, str) or len(path) > 4096:
            continue
        try:
            resolved = Path(path).resolve()
            if resolved.suffix.lower() != ".png" or not resolved.is_relative_to(folder) or not resolved.is_file():
                continue
            params = read_parameters(resolved)
        except (OSError, ValueError):
            continue
        if params:
            items.append(item(resolved, params))
    return items


def settings_html(params: Optional[dict]) -> str:
    """The clicked image's settings, as the panel beside the gallery shows them."""
    if not params:
        return present.empty_html("Click an image to see its settings here.")
    rows = [("Seed", params.get("seed")), ("Steps", params.get("steps")), ("Guidance", params.get("guidance")),
            ("Scheduler", str(params.get("scheduler", "")).replace("_", " ")),
            ("Size", f"{params.get('width')}×{params.get('height')}"), ("Model", params.get("model")),
            ("Engine", " · ".join(str(params[k]) for k in ("engine", "precision") if params.get(k)))]
    if params.get("quantization") not in (None, "", "none"):
        rows.append(("Quantization", params["quantization"]))
    if params.get("negative_prompt"):
        rows.append(("Negative", params["negative_prompt"]))
    if params.get("init_image"):
        rows.append(("Start image", f"strength {params.get('strength')}" + (" · mask" if params.get("mask") else "")))
    if params.get("loras"):
        rows.append(("LoRA", ", ".join(f"{lo.get('name')} {lo.get('scale')}" for lo in params["loras"])))
    prompt = present.esc(params.get("prompt", ""))
    table = "".join(f"<dt>{present.esc(k)}</dt><dd title='{present.esc(v)}'>{present.esc(v)}</dd>" for k, v in rows)
    return f"<div class='sd-picked'><p class='prompt' title='{prompt}'>{prompt}</p><dl>{table}</dl></div>"


class GalleryPart(AppBase):
    """The gallery's handlers and layout (the Generate tab's bottom row)."""

    def pick(self, history, evt: gr.SelectData):
        """A thumbnail clicked: the image shown, its settings beside the gallery, "Use these settings" enabled."""
        if not history or evt.index is None or not 0 <= evt.index < len(history):
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        path = history[evt.index]["path"]
        params = read_parameters(path) if Path(path).is_file() else None
        return path, settings_html(params), path if params else None, gr.update(interactive=bool(params))

    def use_picked(self, path, lora_rows):
        """The clicked image's settings back in the controls (the Generate tab's restore)."""
        return self.restore(path or None, lora_rows)

    def save_images(self, result, request, history) -> tuple[list, list]:
        """Each image of a run saved as its own PNG with its own parameters (its seed: backend/seeds.py); returns
        (the run's gallery items, the gallery with them first)."""
        items = []
        for i, image in enumerate(result.images):
            params = result.image_parameters(i)
            items.append(item(self.outputs.save(image, params), params))
        self.outputs.keep_inputs(result.parameters, request)  # so that the PNGs restore their start image and mask
        return items, (items + list(history or []))[:HISTORY_SIZE]

    def load_saved(self, saved):
        """On page load: the gallery the browser kept, checked here (ui.gallery.trusted_items)."""
        history = trusted_items(saved, self.outputs.folder)
        return history, gallery_value(history)

    def gallery_row(self):
        """The gallery, the clicked image's settings with "Use these settings", and the PNG drop."""
        u = self.ui
        with gr.Row(equal_height=True):
            u.gallery = gr.Gallery(label="Your images (kept across reloads): click one to see its settings",
                                   format="png", columns=5, height=230, allow_preview=False, scale=5,
                                   elem_id="session-gallery", fit_columns=False, object_fit="contain",
                                   elem_classes=["sd-px", "sd-thumbs"])
            with gr.Column(scale=2, min_width=260):
                u.picked_settings = gr.HTML(settings_html(None), elem_id="picked-settings")
                u.use_settings = gr.Button("Use these settings", size="sm", interactive=False, elem_id="use-settings")
            u.drop = gr.Image(label="Drop a PNG made by this app", type="filepath", format="png",
                              sources=["upload"], height=230, scale=1, min_width=200)
        u.picked = gr.State(None)
        u.saved_history = browser_state(home(), self.outputs.folder)

    def wire_gallery(self, restored: list):
        """The gallery's events; `restored` are the outputs of the Generate tab's restore()."""
        u = self.ui
        picked = [u.image, u.picked_settings, u.picked, u.use_settings]
        u.gallery.select(self.pick, u.history, picked, queue=False, **PRIVATE)
        u.batch_grid.select(self.pick, u.batch_items, picked, queue=False, **PRIVATE)
        u.use_settings.click(self.use_picked, [u.picked, u.loras], restored, queue=False, **PRIVATE)

    def wire_reload(self, demo: gr.Blocks):
        """The page's load event brings the kept gallery back (app.py calls this with the page)."""
        u = self.ui
        demo.load(self.load_saved, u.saved_history, [u.history, u.gallery], queue=False, **PRIVATE)
