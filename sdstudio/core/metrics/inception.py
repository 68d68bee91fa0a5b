"""Inception-v3 as the FID papers use it: the TF "2015-12-05" graph, 2048-d pool3 features.

Written from the architecture in Szegedy et al. 2016 ("Rethinking the Inception Architecture for Computer
Vision") with the differences of the TensorFlow graph that FID was defined on (Heusel et al. 2017):

- the average pools inside the mixed blocks do not count the zero padding (TF's "SAME" average pool), so
  they use ``count_include_pad=False``;
- the last mixed block (``Mixed_7c``) pools its pool branch with a 3x3 *max* pool where the paper has an
  average pool;
- the classifier has 1008 outputs (the TF graph's label space), not 1000; FID never uses it.

Module names follow the usual PyTorch port of that graph, so ``state_dict()`` keys are those of the public
``pt_inception-2015-12-05-6726825d.pth`` file (``Conv2d_1a_3x3.conv.weight``, ``Mixed_5b.branch1x1.bn.
running_mean``, ..., ``fc.weight``). Images enter as floats in [0, 1]; they are resized to 299x299 with
bilinear interpolation (``align_corners=False``) and scaled to [-1, 1], as pytorch-fid does.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..checksums import sha256_file
from ..errors import UserError

WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_FILENAME}"
# torch.hub names files <name>-<first 8 hex digits of the sha256>.<ext>.
WEIGHTS_SHA256_PREFIX = "6726825d"
CONFIG_KEY = "eval.inception_weights"
FEATURE_DIM = 2048
INPUT_SIZE = 299
NUM_CLASSES = 1008


class InceptionWeightsError(UserError):
    """The Inception weights file is missing, unreadable or not the FID Inception."""


class ConvUnit(nn.Module):
    """Convolution without bias, batch norm (TF's eps 1e-3), ReLU: the unit every layer is built from."""

    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int], stride: int = 1,
                 padding: int | tuple[int, int] = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    # TF's SAME average pool divides by the number of real pixels under the window, not by 9.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class Mixed35(nn.Module):
    """35x35 grid block (paper fig. 5): 1x1, 5x5, double 3x3 and pool branches."""

    def __init__(self, cin: int, pool_channels: int) -> None:
        super().__init__()
        self.branch1x1 = ConvUnit(cin, 64, 1)
        self.branch5x5_1 = ConvUnit(cin, 48, 1)
        self.branch5x5_2 = ConvUnit(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvUnit(cin, 64, 1)
        self.branch3x3dbl_2 = ConvUnit(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvUnit(96, 96, 3, padding=1)
        self.branch_pool = ConvUnit(cin, pool_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = self.branch5x5_2(self.branch5x5_1(x))
        deep = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), wide, deep, self.branch_pool(_tf_avg_pool(x))], dim=1)


class Reduce35to17(nn.Module):
    """Grid reduction 35 -> 17: strided 3x3, strided double 3x3, strided max pool."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = ConvUnit(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvUnit(cin, 64, 1)
        self.branch3x3dbl_2 = ConvUnit(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvUnit(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        deep = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), deep, F.max_pool2d(x, kernel_size=3, stride=2)], dim=1)


class Mixed17(nn.Module):
    """17x17 grid block (paper fig. 6): 7x7 convolutions factorised into 1x7 and 7x1."""

    def __init__(self, cin: int, mid: int) -> None:
        super().__init__()
        row, col = (1, 7), (7, 1)
        row_pad, col_pad = (0, 3), (3, 0)
        self.branch1x1 = ConvUnit(cin, 192, 1)
        self.branch7x7_1 = ConvUnit(cin, mid, 1)
        self.branch7x7_2 = ConvUnit(mid, mid, row, padding=row_pad)
        self.branch7x7_3 = ConvUnit(mid, 192, col, padding=col_pad)
        self.branch7x7dbl_1 = ConvUnit(cin, mid, 1)
        self.branch7x7dbl_2 = ConvUnit(mid, mid, col, padding=col_pad)
        self.branch7x7dbl_3 = ConvUnit(mid, mid, row, padding=row_pad)
        self.branch7x7dbl_4 = ConvUnit(mid, mid, col, padding=col_pad)
        self.branch7x7dbl_5 = ConvUnit(mid, 192, row, padding=row_pad)
        self.branch_pool = ConvUnit(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        single = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        double = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            double = layer(double)
        return torch.cat([self.branch1x1(x), single, double, self.branch_pool(_tf_avg_pool(x))], dim=1)


class Reduce17to8(nn.Module):
    """Grid reduction 17 -> 8: strided 3x3 after 1x1, strided 3x3 after 1x7/7x1, strided max pool."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = ConvUnit(cin, 192, 1)
        self.branch3x3_2 = ConvUnit(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvUnit(cin, 192, 1)
        self.branch7x7x3_2 = ConvUnit(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvUnit(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvUnit(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        short = self.branch3x3_2(self.branch3x3_1(x))
        long = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            long = layer(long)
        return torch.cat([short, long, F.max_pool2d(x, kernel_size=3, stride=2)], dim=1)


class Mixed8(nn.Module):
    """8x8 grid block (paper fig. 7): expanded filter bank, 1x3 and 3x1 side by side.

    ``max_pool=True`` is the TF graph's ``Mixed_7c``, which max-pools its pool branch.
    """

    def __init__(self, cin: int, *, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = ConvUnit(cin, 320, 1)
        self.branch3x3_1 = ConvUnit(cin, 384, 1)
        self.branch3x3_2a = ConvUnit(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvUnit(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvUnit(cin, 448, 1)
        self.branch3x3dbl_2 = ConvUnit(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvUnit(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvUnit(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvUnit(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch3x3_1(x)
        b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _tf_avg_pool(x)
        return torch.cat([self.branch1x1(x),
                          self.branch3x3_2a(a), self.branch3x3_2b(a),
                          self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b),
                          self.branch_pool(pooled)], dim=1)


class FidInceptionV3(nn.Module):
    """The FID feature network; ``forward`` maps (N, 3, H, W) floats in [0, 1] to (N, 2048) pool3 features."""

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = ConvUnit(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvUnit(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvUnit(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvUnit(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvUnit(80, 192, 3)
        self.Mixed_5b = Mixed35(192, pool_channels=32)
        self.Mixed_5c = Mixed35(256, pool_channels=64)
        self.Mixed_5d = Mixed35(288, pool_channels=64)
        self.Mixed_6a = Reduce35to17(288)
        self.Mixed_6b = Mixed17(768, mid=128)
        self.Mixed_6c = Mixed17(768, mid=160)
        self.Mixed_6d = Mixed17(768, mid=160)
        self.Mixed_6e = Mixed17(768, mid=192)
        self.Mixed_7a = Reduce17to8(768)
        self.Mixed_7b = Mixed8(1280, max_pool=False)
        self.Mixed_7c = Mixed8(2048, max_pool=True)
        # Unused by FID; present so the module's keys are exactly the weights file's.
        self.fc = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        x = 2.0 * x - 1.0
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return x.mean(dim=(2, 3))


def _is_bookkeeping(key: str) -> bool:
    # BatchNorm's step counter: absent from files saved by old torch versions, never used in eval mode.
    return key.endswith("num_batches_tracked")


def _read_state_dict(path: Path) -> Mapping[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: object = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable or non-tensor pickle ends here; say which file
        raise InceptionWeightsError(
            f"Cannot read Inception weights from {path}: {type(exc).__name__}: {exc}. Expected the state-dict "
            f"file {WEIGHTS_FILENAME} ({WEIGHTS_URL}); set {CONFIG_KEY} to its path.") from exc
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InceptionWeightsError(
            f"{path} is not a state dict of tensors (found {type(obj).__name__}). Expected {WEIGHTS_FILENAME} "
            f"({WEIGHTS_URL}).")
    return obj


def _list(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def load_fid_inception(path: str | Path, *, check_hash: bool = False) -> FidInceptionV3:
    """Build the FID Inception and load the pt_inception-2015-12-05 weights from ``path`` (eval mode, CPU).

    Raises InceptionWeightsError naming the file and what is wrong: missing, unreadable, keys missing or
    foreign, shapes that differ (e.g. torchvision's 1000-class ImageNet Inception, which is not the FID one).
    ``check_hash`` also requires the sha256 of the published file (costs a read of ~95 MB).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise InceptionWeightsError(
            f"Inception weights file not found: {path}. Download {WEIGHTS_FILENAME} from {WEIGHTS_URL} "
            f"(the file pytorch-fid and clean-fid use) and set {CONFIG_KEY} to its path.")
    state = _read_state_dict(path)
    model = FidInceptionV3()
    expected = {k: v for k, v in model.state_dict().items() if not _is_bookkeeping(k)}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected and not _is_bookkeeping(k)]
    if missing or unexpected:
        parts = [f"{path} does not hold the FID Inception-v3 weights ({WEIGHTS_FILENAME})."]
        if missing:
            parts.append(f"Missing {len(missing)} of {len(expected)} keys: {_list(missing)}.")
        if unexpected:
            parts.append(f"Keys this network does not have: {_list(unexpected)}.")
        parts.append(f"Get the right file from {WEIGHTS_URL} and set {CONFIG_KEY} to it.")
        raise InceptionWeightsError(" ".join(parts))
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
             for k, v in expected.items() if state[k].shape != v.shape]
    if wrong:
        hint = (" A 1000-class classifier means torchvision's ImageNet Inception, whose features differ from the "
                "FID graph's." if state["fc.weight"].shape[0] == 1000 else "")
        raise InceptionWeightsError(
            f"{path}: tensor shapes differ from the FID Inception-v3: {_list(wrong, 3)}.{hint} "
            f"Use {WEIGHTS_FILENAME} ({WEIGHTS_URL}).")
    if check_hash and not sha256_file(path).startswith(WEIGHTS_SHA256_PREFIX):
        raise InceptionWeightsError(
            f"{path} has the right layout but not the published weights (sha256 does not start with "
            f"{WEIGHTS_SHA256_PREFIX}); FIDs from it are not comparable with published numbers.")
    model.load_state_dict({k: state[k].float() for k in expected}, strict=False)
    return model.eval().requires_grad_(False)


def download_fid_weights(folder: str | Path) -> Path:
    """Download the published weights file into ``folder`` once (sha256 checked); return its path."""
    target = Path(folder) / WEIGHTS_FILENAME
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(WEIGHTS_URL, str(target), hash_prefix=WEIGHTS_SHA256_PREFIX,
                                           progress=False)
        except Exception as exc:  # offline, proxy, or a corrupted download: say so with the manual route
            raise InceptionWeightsError(
                f"Could not download {WEIGHTS_URL} to {target}: {exc}. Download it by hand and set "
                f"{CONFIG_KEY} to its path.") from exc
    return target
