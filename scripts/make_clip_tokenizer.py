"""Regenerate the bundled CLIP tokenizer files in resources/tokenizers/ from the open-clip-torch wheel.

CLIP's BPE vocabulary ships as ``open_clip/bpe_simple_vocab_16e6.txt.gz`` inside the open-clip-torch wheel.
This script fetches the wheel with ``pip download --no-deps`` (never installs it: it pulls torchvision and
timm), reads that file out of the zip and writes the Hugging Face layout that ``CLIPTokenizer`` loads:

- ``resources/tokenizers/clip/``   CLIP ViT-L/14 (SD1.x ``tokenizer``, SDXL ``tokenizer``): pads with
  ``<|endoftext|>`` (id 49407). The only copy of vocab.json and merges.txt in the package.
- ``resources/tokenizers/clip-g/`` OpenCLIP ViT-H / bigG (SD2.x ``tokenizer``, SDXL ``tokenizer_2``): the same
  vocabulary, but pads with ``"!"`` (id 0) as Stability's published diffusers configs do. Configs only: the
  loader (sdstudio.core.models.sd.offline.load_clip_tokenizer) takes the BPE files from ``clip/``.

Run from anywhere: ``python scripts/make_clip_tokenizer.py`` (or ``--wheel PATH`` to use a wheel you have).
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
TOKENIZERS_DIR = REPO_ROOT / "resources" / "tokenizers"
BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"

VOCAB_SIZE = 49408
# CLIP keeps the first 49152 - 256 - 2 merges: 256 byte tokens + 256 "</w>" tokens + merges + 2 specials.
NUM_MERGES = 49152 - 256 - 2
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
MODEL_MAX_LENGTH = 77


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable unicode character table (256 entries, in vocabulary order)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    byte_values = printable[:]
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in byte_values:
            byte_values.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(byte_values, (chr(c) for c in chars)))


def download_wheel(dest: Path) -> Path:
    """``pip download --no-deps open-clip-torch`` into dest; returns the wheel path."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "open-clip-torch",
         "-d", str(dest)],
        check=True,
    )
    wheels = sorted(dest.glob("open_clip_torch-*.whl"))
    if not wheels:
        raise FileNotFoundError(f"pip download left no open_clip_torch wheel in {dest}")
    return wheels[-1]


def read_bpe_lines(wheel: Path) -> list[str]:
    """The merge lines of bpe_simple_vocab_16e6.txt inside the wheel (header line dropped)."""
    with zipfile.ZipFile(wheel) as archive:
        text = gzip.decompress(archive.read(BPE_MEMBER)).decode("utf-8")
    # the first line is a header ('"bpe_simple_vocab_16e6.txt#version: 0.2'), as CLIP's own reader assumes
    return text.split("\n")[1 : NUM_MERGES + 1]


def build_vocab(merge_lines: list[str]) -> dict[str, int]:
    """CLIP's vocabulary: 256 byte chars, the same with ``</w>``, one token per merge, then BOS and EOS."""
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    tokens += ["".join(line.split()) for line in merge_lines]
    tokens += [BOS, EOS]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"built {len(vocab)} distinct tokens, expected {VOCAB_SIZE}: is this the CLIP BPE file?")
    return vocab


def _added_token(content: str, normalized: bool) -> dict[str, object]:
    return {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False,
            "single_word": False, "special": True}


def tokenizer_config(pad_token: str) -> tuple[dict[str, object], dict[str, str]]:
    """tokenizer_config.json and special_tokens_map.json for a CLIP tokenizer padding with pad_token."""
    added = {"49406": _added_token(BOS, True), "49407": _added_token(EOS, False)}
    if pad_token == "!":
        # what stabilityai's SD2 / SDXL tokenizer_2 configs carry: "!" (id 0) registered as the pad token
        added = {"0": _added_token("!", False), **added}
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "bos_token": BOS,
        "clean_up_tokenization_spaces": False,
        "do_lower_case": True,
        "eos_token": EOS,
        "errors": "replace",
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": pad_token,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": EOS,
    }
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": pad_token, "unk_token": EOS}
    return config, special


def write_tokenizer(folder: Path, vocab: dict[str, int] | None, merge_lines: list[str] | None,
                    pad_token: str) -> None:
    """The tokenizer configs, and the BPE files when ``vocab`` / ``merge_lines`` are given (clip/ only)."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in ("vocab.json", "merges.txt"):
        (folder / stale).unlink(missing_ok=True)
    if vocab is not None and merge_lines is not None:
        (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merge_lines) + "\n", encoding="utf-8")
    config, special = tokenizer_config(pad_token)
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheel", type=Path, help="an open_clip_torch wheel to read (default: pip download)")
    parser.add_argument("--out", type=Path, default=TOKENIZERS_DIR, help="folder for clip/ and clip-g/")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel or download_wheel(Path(tmp))
        merge_lines = read_bpe_lines(wheel)
        print(f"read {len(merge_lines)} merges from {wheel.name}")
    vocab = build_vocab(merge_lines)
    write_tokenizer(args.out / "clip", vocab, merge_lines, pad_token=EOS)
    write_tokenizer(args.out / "clip-g", None, None, pad_token="!")  # shares clip/'s BPE files
    print(f"wrote {args.out / 'clip'} and {args.out / 'clip-g'} ({len(vocab)} tokens)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
