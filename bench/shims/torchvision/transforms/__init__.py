"""transforms.* as diffusers' example scripts call them (PIL in, tensors out)."""
import enum
import random

import numpy as np
import torch
from PIL import Image

from . import functional  # noqa: F401


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest_exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


_PIL = {"nearest": Image.NEAREST, "nearest_exact": Image.NEAREST, "bilinear": Image.BILINEAR,
        "bicubic": Image.BICUBIC, "box": Image.BOX, "hamming": Image.HAMMING, "lanczos": Image.LANCZOS}


def _size(size):
    return (size, size) if isinstance(size, int) else tuple(size)


class Compose:
    def __init__(self, transforms):
        self.transforms = transforms

    def __call__(self, x):
        for t in self.transforms:
            x = t(x)
        return x


class Resize:
    """The shorter side to `size` (an int), keeping the aspect ratio, as torchvision's Resize."""

    def __init__(self, size, interpolation=InterpolationMode.BILINEAR, antialias=True):
        self.size, self.mode = size, _PIL[getattr(interpolation, "value", interpolation)]

    def __call__(self, image):
        w, h = image.size
        if isinstance(self.size, int):
            short = self.size
            nw, nh = (short, max(1, round(h * short / w))) if w <= h else (max(1, round(w * short / h)), short)
        else:
            nh, nw = self.size
        return image.resize((nw, nh), self.mode)


class CenterCrop:
    def __init__(self, size):
        self.size = _size(size)

    def __call__(self, image):
        th, tw = self.size
        w, h = image.size
        top, left = int(round((h - th) / 2.0)), int(round((w - tw) / 2.0))
        return image.crop((left, top, left + tw, top + th))


class RandomCrop:
    def __init__(self, size):
        self.size = _size(size)

    @staticmethod
    def get_params(image, output_size):
        w, h = image.size
        th, tw = output_size
        return random.randint(0, h - th), random.randint(0, w - tw), th, tw

    def __call__(self, image):
        top, left, h, w = self.get_params(image, self.size)
        return image.crop((left, top, left + w, top + h))


class RandomHorizontalFlip:
    def __init__(self, p=0.5):
        self.p = p

    def __call__(self, image):
        return image.transpose(Image.FLIP_LEFT_RIGHT) if random.random() < self.p else image


class ToTensor:
    def __call__(self, image):
        return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


class Normalize:
    def __init__(self, mean, std):
        self.mean, self.std = mean, std

    def __call__(self, tensor):
        mean = torch.tensor(self.mean).view(-1, 1, 1)
        std = torch.tensor(self.std).view(-1, 1, 1)
        return (tensor - mean) / std
