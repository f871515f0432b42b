"""The app's one folder for files: images, kept inputs and Gradio's uploads live there, each image once, and a
retention policy (count and bytes, oldest first, never a file younger than its grace period) bounds it."""
import hashlib
import os
import socket
import time

import gradio_client
import numpy as np
import pytest
from gradio_client import handle_file
from PIL import Image

from backend.session import OutputFolder, Retention


def write(folder, name, size, age, now):
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    os.utime(path, (now - age, now - age))
    return path


def test_retention_deletes_the_oldest_beyond_the_count_and_the_bytes(tmp_path):
    now = time.time()
    out = OutputFolder(tmp_path, Retention(files=3, bytes=10**9, grace=60))
    paths = [write(tmp_path, f"{i}.png", 10, age=1000 - i, now=now) for i in range(5)]
    upload = write(tmp_path, "a1b2c3/upload.png", 10, age=2000, now=now)  # Gradio's upload folder, oldest
    deleted = out.prune(now)
    assert set(deleted) == {upload, paths[0], paths[1]}
    assert not upload.parent.exists()  # its emptied folder went with it
    assert all(p.exists() for p in paths[2:])

    out.retention = Retention(files=100, bytes=25, grace=60)
    assert out.prune(now) == [paths[2]] and paths[3].exists()


def test_retention_never_deletes_a_file_in_its_grace_period(tmp_path):
    now = time.time()
    out = OutputFolder(tmp_path, Retention(files=1, bytes=1, grace=600))
    young = [write(tmp_path, f"{i}.png", 10, age=10 + i, now=now) for i in range(3)]
    assert out.prune(now) == [] and all(p.exists() for p in young)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    os.environ["SILICON_DIFFUSION_HOME"] = str(home)
    import app as webapp
    application = webapp.App("tiny-shapes")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo, url = webapp.launch(application, port=port, prevent_thread_lock=True, quiet=True)
    yield application, url
    demo.close()


def digests(folder):
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()]


def test_images_and_uploads_live_in_the_apps_folder_each_image_once(served, tmp_path):
    application, url = served
    folder = application.outputs.folder
    assert os.environ["GRADIO_TEMP_DIR"] == str(folder)
    client = gradio_client.Client(url, verbose=False)
    start = tmp_path / "start.png"
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(start)
    path, _ = client.predict("a large red circle in the center on a blue background", steps=2, seed=3,
                             init_image=handle_file(str(start)), strength=0.5, api_name="/generate")
    made = hashlib.sha256(open(path, "rb").read()).hexdigest()
    everything = digests(folder)
    assert everything.count(made) == 1  # saved once, served from where it was saved
    assert hashlib.sha256(start.read_bytes()).hexdigest() in everything  # the upload landed here too
