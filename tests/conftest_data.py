"""Builders for the dataset-scan tests: every fixture folder is generated in tmp_path, nothing downloaded.

Not a conftest.py (the lead owns that): the data tests import these helpers.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

RED = (255, 0, 0)


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    """Smooth random colour blobs (mid-tones, so brightening does not clip): distinct per seed."""
    rng = np.random.default_rng(seed)
    grid = rng.integers(40, 200, (max(2, height // 8), max(2, width // 8), 3), dtype=np.uint8)
    return Image.fromarray(grid).resize((width, height), Image.Resampling.BICUBIC)


def save(img: Image.Image, path: Path, **params: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **params)
    return path


def write_png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose IHDR claims width x height (no pixel data): a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def write_exif_rotated_jpeg(path: Path) -> Path:
    """Stored 96x64 with a red block at the stored top-left and EXIF orientation 6 (rotate 90 deg CW).

    Shown correctly it is 64x96 with the red block at the top-RIGHT corner.
    """
    img = noise_image(96, 64, seed=60)
    img.paste(RED, (0, 0, 16, 16))
    exif = Image.Exif()
    exif[0x0112] = 6
    return save(img, path, format="JPEG", quality=95, exif=exif.tobytes())


def write_truncated_jpeg(path: Path) -> Path:
    buffer = io.BytesIO()
    noise_image(96, 80, seed=61).save(buffer, format="JPEG", quality=90)
    data = buffer.getvalue()
    path.write_bytes(data[: len(data) * 6 // 10])
    return path


def write_gray16_png(path: Path) -> Path:
    """16-bit grey: left half 65535, right half 32896 (-> 255 and 128 in 8 bits, not both 255)."""
    array = np.full((64, 64), 32896, dtype=np.uint16)
    array[:, :32] = 65535
    array[0:8, 40:48] = 1000  # structure, so it is no near-duplicate of another flat image
    img = Image.fromarray(array)
    assert img.mode == "I;16"
    return save(img, path, format="PNG")


def write_palette_png(path: Path) -> Path:
    """Palette image, index 0 transparent (top-left 8x8), index 1 blue elsewhere."""
    img = Image.new("P", (64, 64), 1)
    img.putpalette([0, 255, 0, 0, 0, 255] + [0, 0, 0] * 254)
    img.paste(0, (0, 0, 8, 8))
    return save(img, path, format="PNG", transparency=0)


def write_animated_gif(path: Path) -> Path:
    """Two frames: red then blue; only the first should be used."""
    frames = [Image.new("RGB", (64, 64), RED), Image.new("RGB", (64, 64), (0, 0, 255))]
    path.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(path, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return path


def make_messy_folder(root: Path) -> Path:
    """A plain folder with one of every problem a real dataset has (see the test for the expectations)."""
    root.mkdir(parents=True)
    good = save(noise_image(96, 80, seed=1), root / "good.png")
    (root / "good.txt").write_text("a red thing\n\n   second caption  \n", encoding="utf-8")
    brighter = ImageEnhance.Brightness(Image.open(good).convert("RGB")).enhance(1.08)
    save(brighter, root / "good_bright.png")  # near-duplicate of good.png
    (root / "sub").mkdir()
    (root / "sub" / "good_copy.png").write_bytes(good.read_bytes())  # exact duplicate
    try:
        os.symlink("..", root / "sub" / "loop")  # a cycle back to the root
    except (OSError, NotImplementedError):  # Windows without the symlink privilege
        pass
    write_truncated_jpeg(root / "truncated.jpg")
    (root / "empty.png").write_bytes(b"")
    (root / "notes.jpg").write_text("this is not a JPEG\n", encoding="utf-8")
    save(Image.new("CMYK", (64, 64), (255, 0, 0, 0)), root / "cmyk.jpg", format="JPEG")
    write_gray16_png(root / "gray16.png")
    write_palette_png(root / "palette.png")
    write_exif_rotated_jpeg(root / "rotated.jpg")
    write_animated_gif(root / "anim.gif")
    save(noise_image(8, 8, seed=2), root / "tiny.png")
    save(noise_image(4000, 100, seed=3), root / "sliver.png")
    write_png_header_only(root / "huge.png", 60000, 60000)
    save(noise_image(64, 64, seed=4), root / ".hidden.png")
    (root / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "Thumbs.db").write_bytes(b"junk")
    (root / "__MACOSX").mkdir()
    (root / "__MACOSX" / "._good.png").write_bytes(b"junk")
    (root / "orphan.txt").write_text("a caption without its image", encoding="utf-8")
    save(noise_image(64, 64, seed=5), root / "latin1.png")
    (root / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    save(noise_image(64, 64, seed=6), root / "nocap.png")
    save(noise_image(64, 64, seed=7), root / "runs" / "r.png")  # a "runs" folder is just a folder
    return root


def make_kohya_folder(root: Path) -> Path:
    concept = root / "10_sks dog"
    save(noise_image(64, 64, seed=20), concept / "a.png")
    (concept / "a.txt").write_text("sks dog on a beach", encoding="utf-8")
    save(noise_image(64, 64, seed=21), concept / "b.png")
    save(noise_image(64, 64, seed=22), concept / "c.jpg", quality=95)
    save(noise_image(64, 64, seed=23), root / "2_cat" / "x.png")
    save(noise_image(64, 64, seed=24), root / "reg stuff" / "y.png")
    save(noise_image(64, 64, seed=25), root / "0_zero" / "z.png")
    save(noise_image(64, 64, seed=26), root / "root.png")
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n", encoding="utf-8")
    return root


def make_imagefolder(root: Path, kind: str = "jsonl") -> Path:
    """metadata.jsonl (or .csv) folder; a.png also has a sidecar, which metadata beats."""
    for i, name in enumerate(("a.png", "b.png", "sub/c.png", "d.png", "e.png")):
        save(noise_image(64, 64, seed=40 + i), root / name)
    (root / "a.txt").write_text("sidecar loses", encoding="utf-8")
    (root / "d.txt").write_text("sidecar d", encoding="utf-8")
    if kind == "jsonl":
        rows = [
            json.dumps({"file_name": "a.png", "text": "cat one"}),
            json.dumps({"file_name": "b.png", "text": "first line\nsecond line"}),
            json.dumps({"file_name": "sub/c.png", "caption": "third"}),
            json.dumps({"file_name": "missing.png", "text": "x"}),
            "this line is not json",
        ]
        (root / "metadata.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    else:
        (root / "metadata.csv").write_text(
            'file_name,label\na.png,cat one\nb.png,"first line\nsecond line"\nsub/c.png,third\n'
            "missing.png,x\n", encoding="utf-8")
    return root


def snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    """Every entry under root (links not followed): mode, mtime_ns and a content hash for files."""
    state: dict[str, tuple[int, int, str]] = {}
    for folder, dirs, files in os.walk(root, followlinks=False):
        for name in dirs + files:
            path = Path(folder) / name
            st = os.lstat(path)
            digest = ""
            if path.is_file() and not path.is_symlink():
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
            state[str(path.relative_to(root))] = (st.st_mode, st.st_mtime_ns, digest)
    return state


def with_data_keys(config, **keys):
    """``config`` with ``data.<key>`` set for each keyword."""
    return config.with_overrides({f"data.{k}": v for k, v in keys.items()})


def make_aspect_folder(root: Path, per_shape: int = 4) -> Path:
    """Captioned images in three aspect ratios (square, 2:1 wide, 1:2 tall)."""
    for i in range(per_shape):
        for name, (w, h) in (("square", (48, 48)), ("wide", (96, 48)), ("tall", (48, 96))):
            save(noise_image(w, h, seed=100 + i * 3 + len(name)), root / f"{name}{i}.png")
            (root / f"{name}{i}.txt").write_text(f"a {name} picture", encoding="utf-8")
    return root
