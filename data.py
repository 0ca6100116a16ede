"""Data: CIFAR-10 or an image folder, the train/validation split, and augmentation.

An image folder is decoded once into a cache file of raw uint8 pixels that every later run and
process maps into memory (50,000 CIFAR images are 147 MiB). A split is held as one uint8 tensor
on the training device, or read batch by batch from the mapped file when it does not fit. Batches
are augmented as whole batches on the device, each sample with its own random numbers, so no
per-sample Python runs in the training loop.
"""

import argparse
import contextlib
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import stat
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torchvision.datasets import CIFAR10
from tqdm.auto import tqdm

try:
    import fcntl  # the cache's and the run folder's locks; Windows has none
except ImportError:
    fcntl = None

# torchvision ImageFolder's formats, and GIF (its first frame); matched whatever the case (.JPG)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp", ".gif")
DEFAULT_DATA_DIR = "./data"  # the only folder CIFAR-10 is downloaded into unless the user made one for it
TRANSPARENT_BACKGROUND = (255, 255, 255)  # transparent pixels (PNG, GIF) become white, as on a page
VAL_FOLDERS = ("val", "valid", "validation")  # DIR/<one of these>/ beside DIR/train/ is the validation split
SPLIT_FOLDERS = ("train", "test", *VAL_FOLDERS)  # each of their subfolders is read as a class
# a run's resumable state (train.py's save_state), newest first: state-tmp is being written (complete once its
# progress.json is), state the last one, state-old the one before, during the swap
STATE_DIRS = ("state-tmp", "state", "state-old")
# Sizes, from the median shorter side of the training images. CIFAR-10, and folders of images no
# larger, are kept at 32x32; small images up to SMALL_SIDE (Tiny ImageNet's 64x64) at that median
# side. Both are trained with a padded random crop. Larger images are photos: kept at STORED_SCALE x
# the crop (256 for 224, ImageNet's resize before its centre crop), trained on random-resized crops
# and evaluated on the centre crop. Every image is stored as its shorter side resized, then the centre square.
IMAGE_SIZE = 32
SMALL_SIDE = 64
PHOTO_INPUT_SIZE = 224  # the crop ImageNet-pretrained ResNet18 was trained on
STORED_SCALE = 8 / 7  # 224 -> 256
CROP_AREA = (0.08, 1.0)  # random-resized crop: fraction of the stored image, and its aspect ratio (torchvision's)
CROP_RATIO = (3 / 4, 4 / 3)
MEMORY_SHARE = 0.5  # of the free memory, for the decoded images: decoding holds two copies for a moment
TRAINING_ADVICE = "pass a smaller --batch-size, --input-size or --max-train-samples"  # when they would not fit
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # photos: the statistics the pretrained weights were trained with
IMAGENET_STD = (0.229, 0.224, 0.225)

# Class groups, used for the vehicles-vs-animals report, the two-stage head and the default
# targets of --targeted-augment. Edit here for another dataset.
GROUPS = {
    "vehicles": ("airplane", "automobile", "ship", "truck"),
    "animals": ("bird", "cat", "deer", "dog", "frog", "horse"),
}

# Targeted augmentation (the seed write-up's advice for the animal classes).
ROTATION_DEGREES = 30
JITTER = 0.4  # brightness, contrast and saturation factors drawn from [1 - JITTER, 1 + JITTER]
ERASE_PROBABILITY = 0.5
ERASE_AREA = (0.02, 0.33)  # fraction of the image, as torchvision's RandomErasing
ERASE_RATIO = (0.3, 3.3)

# --auto-augment: TrivialAugment-wide (Mueller & Hutter 2021) and RandAugment (Cubuk et al. 2020), with
# torchvision's operations and magnitudes. Each image draws an operation, a sign and a strength, a bin
# of 0..30 (TrivialAugment: any; RandAugment: always RAND_AUGMENT_BIN, RAND_AUGMENT_OPS times in a row).
AUTO_AUGMENT_OPS = ("identity", "shear_x", "shear_y", "translate_x", "translate_y", "rotate", "brightness",
                    "color", "contrast", "sharpness", "posterize", "solarize", "autocontrast", "equalize")  # fmt: skip
# What bin 30 does: shear factor, translation (pixels + a share of the side), degrees, the enhancement
# factors' distance from 1 (brightness, color, contrast, sharpness), and posterize's fewest bits.
AUTO_AUGMENT_RANGES = {
    "ta_wide": dict(shear=0.99, translate=(32, 0), rotate=135, enhance=0.99, bits=2),
    "ra": dict(shear=0.3, translate=(0, 150 / 331), rotate=30, enhance=0.9, bits=4),
}
AUTO_AUGMENT_BINS = 31
RAND_AUGMENT_OPS, RAND_AUGMENT_BIN = 2, 9  # torchvision's RandAugment(num_ops=2, magnitude=9)


# PIL warns of odd but readable files (corrupt EXIF, large images) in lines of its own; read_image
# reads them, or skips and names them when they cannot be read.
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


LOG = print  # where data.py's lines go; train.py sends them through accelerate, one process a machine


def augment(images, labels, generator, padding=4, targeted_labels=None, resized_crop=None, policy="none"):
    """uint8 batch -> float batch in [0, 1], in training only (evaluation's preprocessing is normalizer's).
    Each step transforms the whole batch on its device, each image with its own random numbers."""
    if resized_crop:  # photos: torchvision's RandomResizedCrop(resized_crop) and RandomHorizontalFlip
        images = random_resized_crop_flip(images, resized_crop, generator)
    else:  # CIFAR-sized: RandomCrop(side, padding) and RandomHorizontalFlip
        images = random_crop_flip(images, padding, generator).float().div_(255)
    if policy != "none":  # --auto-augment: TrivialAugmentWide or RandAugment
        images = auto_augment(images, policy, generator)
    if targeted_labels is not None and len(targeted_labels):  # --targeted-augment: rotation, jitter, erasing
        chosen = torch.isin(labels, targeted_labels)
        # Augment the whole batch and keep the chosen rows: fixed shapes, no host sync.
        augmented = color_jitter(rotate(images, ROTATION_DEGREES, generator), JITTER, generator)
        augmented = random_erase(augmented, ERASE_PROBABILITY, generator)
        images = torch.where(chosen[:, None, None, None], augmented, images)
    # A new training-only step goes here, on [0, 1] floats; RandomErasing for every image, say:
    #     images = random_erase(images, ERASE_PROBABILITY, generator)
    return images


def mix(images, labels, generator, mixup_alpha=0.0, cutmix_alpha=0.0):
    """Mixup (Zhang et al. 2018) or CutMix (Yun et al. 2019) of the whole batch, as torchvision's v2
    MixUp and CutMix: each image is mixed with the one before it, keeping a share lam ~ Beta(alpha,
    alpha) of its own (CutMix: the area outside a pasted box). With both, each batch takes one at
    random. Returns (images, the partner labels, the share of each image's own label: a 0-d tensor)."""
    partner_images, partner = images.roll(1, 0), labels.roll(1, 0)
    if mixup_alpha > 0:
        mixup_share = _beta(mixup_alpha, generator, images.device)
        mixed, share = mixup_share * images + (1 - mixup_share) * partner_images, mixup_share
    if cutmix_alpha > 0:
        box = _cutmix_box(images.shape[-2:], _beta(cutmix_alpha, generator, images.device), generator)
        cutmix_images, cutmix_share = torch.where(box, partner_images, images), 1 - box.float().mean()
        if mixup_alpha > 0:  # both: one of the two, drawn on the device (no branch on a device value)
            cutmix = torch.rand((), device=images.device, generator=generator) < 0.5
            mixed, share = torch.where(cutmix, cutmix_images, mixed), torch.where(cutmix, cutmix_share, share)
        else:
            mixed, share = cutmix_images, cutmix_share
    return mixed, partner, share


def normalizer(mean, std, size, device, crop=None):
    """A function: uint8 or [0, 1] float batch -> normalised float batch of size x size pixels,
    channels_last. Batches larger than crop (stored photos, in evaluation) are centre-cropped to it
    first; training batches arrive cropped. Its constants are put on the device here, once: made
    from the tuples for every batch, they would be two blocking host-to-device copies per step on a GPU."""
    mean = torch.tensor(mean, device=device)[:, None, None]
    std = torch.tensor(std, device=device)[:, None, None]

    def normalize(images):
        if crop and images.shape[-1] > crop:
            top, left = (images.shape[-2] - crop) // 2, (images.shape[-1] - crop) // 2
            images = images[..., top : top + crop, left : left + crop]
        if images.dtype == torch.uint8:
            images = images.float().div_(255)
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=size < images.shape[-1])
        return ((images - mean) / std).contiguous(memory_format=torch.channels_last)

    return normalize


class Split(torch.utils.data.Dataset):
    """A split's images (uint8 [N, 3, S, S]) and labels, on the training device or in memory, fetched
    a whole batch at a time by one indexing call (__getitems__). With rows, images is a folder's
    memory-mapped cache and rows the split's: batches are gathered on the host (see make_loader)."""

    def __init__(self, images, labels, rows=None):
        self.images, self.labels, self.rows = images, labels, rows

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return self.__getitems__([index])

    def __getitems__(self, indices):
        index = torch.tensor(indices)
        if self.rows is not None:
            return self.images[self.rows[index]], self.labels[index]
        if self.labels.is_cuda:  # from pinned memory the copy is queued, instead of waiting for the GPU
            index = index.pin_memory()
        index = index.to(self.labels.device, non_blocking=True)
        return self.images[index], self.labels[index]

    def in_memory(self):
        """The split held in this process's memory: a cache's rows gathered (a copy)."""
        return self if self.rows is None else Split(self.images[self.rows], self.labels)

    def to(self, device):
        """The split on the training device; one on disk stays there (its batches move one by one)."""
        return self if self.rows is not None else Split(self.images.to(device), self.labels.to(device))


def _keep_batch(batch):
    return batch  # __getitems__ already returns a stacked batch


def make_loader(split, batch_size, shuffle, drop_last=False):
    """Batches of a Split. From disk to a GPU, two worker processes gather the next batches while
    the GPU trains, into pinned memory for a copy that does not block; elsewhere the batch is one
    indexing call in this process."""
    from_disk_to_gpu = split.rows is not None and torch.cuda.is_available()
    return torch.utils.data.DataLoader(
        split,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        collate_fn=_keep_batch,
        num_workers=2 if from_disk_to_gpu else 0,
        pin_memory=from_disk_to_gpu,
        persistent_workers=from_disk_to_gpu,
    )


def load_split(
    data_dir,
    side,
    val_fraction,
    seed,
    max_train_samples=None,
    device=None,
    parts=("train", "val"),
    expected_classes=None,
    reserved=0,
    listing=None,
    cache_dir=None,
    data_on="device",
    check=None,
):
    """({part: Split} of the parts asked for, class names, the data's fingerprint, where the validation
    images come from, in words). Validation: DIR/val/ when there is one, else a stratified val_fraction
    of train/. data_on: "device" (in memory, checked to fit with `reserved` bytes more), "disk" (read
    batch by batch from the cache in cache_dir; None: no cache) or "auto". listing: list_images(data_dir,
    "train") when the caller has it; check(fingerprint, {part: image count}) may refuse the data before
    any decoding."""
    items, labels, classes = listing or list_images(data_dir, "train")
    advice = "pass the run's --data-dir, or give its class folders their names"
    check_classes(classes, expected_classes, Path(data_dir) / "train", advice)
    if len(classes) == 1:  # a model that is always right: loss 0, 100% accuracy
        raise one_class_error(Path(data_dir) / "train", classes[0])
    val_dir = val_folder_in(data_dir)  # list_images refused a val/ without train/
    if val_dir is None:
        train, val = train_val_indices(labels, classes, val_fraction, seed, max_train_samples)
        sources = {"train": (items, labels, train), "val": (items, labels, val)}
        found = fingerprint(data_dir, items, labels, classes)
        where = f"{val_fraction:.0%} of train/ (stratified, --seed {seed})"
    else:
        sources, found = validation_folder_sources(data_dir, val_dir, items, labels, classes, max_train_samples, seed)
        where = f"{val_dir} (--val-fraction is not used)"
    if check:
        check(found, {part: len(sources[part][2]) for part in parts})
    folders = {"train": Path(data_dir) / "train", "val": val_dir or Path(data_dir) / "train"}
    # a --max-train-samples cut: fewer images in the parts than in the folders they come from
    subset = len(sources["train"][2]) + (len(sources["val"][2]) if val_dir is None else 0) < len(labels)
    cacheable = cache_dir is not None and not isinstance(items, torch.Tensor)  # CIFAR-10's own: in memory
    if cacheable and subset:
        LOG(f"data: the --max-train-samples subset is decoded into memory; the cache in {cache_dir} is not used")
    cached = cacheable and not subset
    data_on = place_data(data_on, cached, cache_dir, subset, sources, parts, side, device, reserved)
    opened = {}  # train/'s cache serves both parts when the validation split is cut from it
    splits = {}
    for part in parts:
        split = load_part(*sources[part], side, folders[part], cache_dir if cached else None, opened, data_on == "disk")
        splits[part] = split if data_on == "disk" else split.in_memory()
    for part, split in splits.items():
        check_every_class_read(part, split.labels, classes, "replace them, or remove the class folder")
    return splits, classes, found, where


def check_every_class_read(part, labels, classes, advice):
    """Refuse a part in which no image of a class could be read: that class would be gone from training,
    or scored 0% in an evaluation."""
    empty = [name for name, n in zip(classes, torch.bincount(labels, minlength=len(classes))) if n == 0]
    if empty:
        raise UserError(
            f"none of the {part} images of class {empty[0]!r} could be read (see the warning above); {advice}"
        )


def load_images(data_dir, split, side=IMAGE_SIZE, expected_classes=None, cache_dir=None, trained=()):
    """Every image of a split, decoded (or read from the cache in cache_dir): (images uint8
    [N, 3, side, side], labels, class names). trained: train/ folders whose images the split must not hold."""
    items, labels, classes = list_images(data_dir, split)
    if not isinstance(items, torch.Tensor) and trained:  # CIFAR-10's test set is its own
        held_out = "the test" if split == "test" else f"{split}/"
        check_held_out(items, [list_folder(Path(folder))[0] for folder in trained], Path(data_dir) / split, held_out)
    own_split = " (or the run's own split: --split val, on the run's --data-dir)" if split == "test" else ""
    check_classes(classes, expected_classes, Path(data_dir) / split, f"evaluate on folders of the checkpoint's "
                  f"classes, all of them{own_split}")  # fmt: skip
    check_memory(len(labels), side, advice=f"free memory, or evaluate part of {split}/ at a time")
    part = load_part(items, labels, torch.arange(len(labels)), side, Path(data_dir) / split, cache_dir, {})
    check_every_class_read(f"{split}/", part.labels, classes, "replace them: an evaluation needs every class")
    return part.in_memory().images, part.labels, classes


def list_images(data_dir, split):
    """(items, labels int64 [N], class names) of split 'train', 'test' or a validation folder's name:
    an image folder's file paths when data_dir has a train/ folder, else torchvision's CIFAR-10,
    whose items are its decoded uint8 images [N, 3, 32, 32]. Nothing of a folder is decoded yet: see decode."""
    root = Path(data_dir)
    if root.exists() and not root.is_dir():
        raise UserError(f"--data-dir {root} is a file; pass a folder")
    if (root / "train").is_dir() or (split != "train" and (root / split).is_dir()):  # test/ alone: held out
        return list_folder(root / split)
    if any(child.is_dir() and child.name != "cifar-10-batches-py" for child in root.glob("*")):
        folder = Path(absolute(root))  # --data-dir . from inside one too
        if folder.name in SPLIT_FOLDERS:
            raise UserError(f"--data-dir {root} is a split's folder; pass the folder that holds it, {folder.parent}")
        held_out = val_folder_in(root) if split == "test" else None
        if held_out:  # DIR/val/ alone: evaluate.py reads it with --split val
            raise UserError(f"--data-dir {root} has {held_out.name}/ but no test/; pass --split val to evaluate it")
        raise UserError(
            f"--data-dir {root} has folders but no {split}/ folder; for your own images pass the folder that "
            f"holds {split}/<class>/ (not {split}/ itself), for CIFAR-10 a folder of its own"
        )
    if not is_cifar10_location(root):
        found = f"neither {split}/<class>/ nor CIFAR-10 there" if root.exists() else "no such folder"
        raise UserError(
            f"--data-dir {root}: {found}; pass the folder that holds {split}/<class>/ or CIFAR-10's "
            f"cifar-10-batches-py/. CIFAR-10 is downloaded only into {DEFAULT_DATA_DIR} (the default) "
            f"or into an empty folder you made for it"
        )
    return load_cifar10(root, train=split == "train")


# ---------------------------------------------------------------------------------- the batched kernels


def random_crop_flip(images, padding, generator):
    """Random crop with zero padding and horizontal flip, as torchvision's RandomCrop(padding=p)
    and RandomHorizontalFlip, drawn independently for every image of the batch."""
    n, channels, height, width = images.shape
    device = images.device
    if padding:
        padded = F.pad(images, (padding,) * 4)
        dy = torch.randint(0, 2 * padding + 1, (n, 1), device=device, generator=generator)
        dx = torch.randint(0, 2 * padding + 1, (n, 1), device=device, generator=generator)
        rows = (dy + torch.arange(height, device=device))[:, None, :, None]
        cols = (dx + torch.arange(width, device=device))[:, None, None, :]
        batch = torch.arange(n, device=device)[:, None, None, None]
        channel = torch.arange(channels, device=device)[None, :, None, None]
        images = padded[batch, channel, rows, cols]
    flip = torch.rand(n, device=device, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(3), images)


def random_resized_crop_flip(images, size, generator):
    """uint8 batch -> float batch [N, 3, size, size] in [0, 1]: a random-resized crop and a horizontal
    flip as torchvision's RandomResizedCrop(size) and RandomHorizontalFlip, each image with its own
    area, aspect ratio, position and flip, sampled in one grid_sample call for the whole batch."""
    n, _, height, width = images.shape
    # torchvision draws up to 10 boxes per image and takes the first that fits; so do we, all at once
    area = _uniform(n * 10, *CROP_AREA, images, generator).view(n, 10) * height * width
    log_ratio = _uniform(n * 10, *map(math.log, CROP_RATIO), images, generator).view(n, 10)
    w, h = (area * log_ratio.exp()).sqrt(), (area / log_ratio.exp()).sqrt()
    fits = (w <= width) & (h <= height)
    first = fits.int().argmax(1, keepdim=True)  # the first box that fits; none fits: the whole image
    found = fits.any(1)
    w = torch.where(found, w.gather(1, first).squeeze(1), width)
    h = torch.where(found, h.gather(1, first).squeeze(1), height)
    left = torch.rand(n, device=images.device, generator=generator) * (width - w)
    top = torch.rand(n, device=images.device, generator=generator) * (height - h)
    flip = torch.rand(n, device=images.device, generator=generator) < 0.5
    # grid_sample's coordinates run from -1 to 1 across the image: scale and shift into the box
    scale_x = torch.where(flip, -w / width, w / width)
    shift_x, shift_y = (2 * left + w) / width - 1, (2 * top + h) / height - 1
    zero = torch.zeros_like(w)
    theta = torch.stack([torch.stack([scale_x, zero, shift_x], 1), torch.stack([zero, h / height, shift_y], 1)], 1)
    grid = F.affine_grid(theta, [n, 3, size, size], align_corners=False)
    return F.grid_sample(images.float().div_(255), grid, mode="bilinear", align_corners=False)


def _uniform(n, low, high, like, generator):
    return low + (high - low) * torch.rand(n, device=like.device, generator=generator)


def rotate(images, degrees, generator):
    angle = _uniform(len(images), -math.radians(degrees), math.radians(degrees), images, generator)
    cos, sin, zero = angle.cos(), angle.sin(), torch.zeros_like(angle)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, padding_mode="zeros", align_corners=False)


def color_jitter(images, strength, generator):
    """Brightness, contrast and saturation, each with its own factor per image (float in [0, 1])."""
    n = len(images)

    def factor():
        return _uniform(n, 1 - strength, 1 + strength, images, generator)[:, None, None, None]

    images = images * factor()
    mean = _gray(images).mean((2, 3), keepdim=True)
    images = (images - mean) * factor() + mean
    gray = _gray(images)
    images = (images - gray) * factor() + gray
    return images.clamp(0, 1)


def _gray(images):
    """Luma, [N, 1, H, W]; Python weights, as a tensor of them would be a copy to the device per batch."""
    red, green, blue = images.split(1, dim=1)
    return 0.299 * red + 0.587 * green + 0.114 * blue


def random_erase(images, probability, generator):
    """Zero one random rectangle per image with the given probability, torchvision's area and ratio ranges.
    On [0, 1] pixels, before normalising, zero is black; torchvision's after Normalize is the mean."""
    n, _, height, width = images.shape
    area = _uniform(n, *ERASE_AREA, images, generator) * height * width
    log_ratio = _uniform(n, math.log(ERASE_RATIO[0]), math.log(ERASE_RATIO[1]), images, generator)
    h = (area * log_ratio.exp()).sqrt().round().clamp(1, height)
    w = (area / log_ratio.exp()).sqrt().round().clamp(1, width)
    top = (torch.rand(n, device=images.device, generator=generator) * (height - h + 1)).floor()
    left = (torch.rand(n, device=images.device, generator=generator) * (width - w + 1)).floor()
    rows = torch.arange(height, device=images.device)[None, :, None]
    cols = torch.arange(width, device=images.device)[None, None, :]
    inside_rows = (rows >= top[:, None, None]) & (rows < (top + h)[:, None, None])
    inside = inside_rows & (cols >= left[:, None, None]) & (cols < (left + w)[:, None, None])
    erase = torch.rand(n, device=images.device, generator=generator) < probability
    return images.masked_fill((inside & erase[:, None, None])[:, None], 0)


def auto_augment(images, policy, generator):
    """TrivialAugment-wide (policy ta_wide) or RandAugment (ra) on a float batch in [0, 1]: each image
    draws its own operations and strengths. The colour operations go first, then the affine ones, all
    rounds' composed into one grid_sample (torchvision applies them in the order drawn, each to a
    uint8 image, with nearest-pixel sampling; here they are bilinear)."""
    n = len(images)
    theta = torch.eye(3, device=images.device).expand(n, 3, 3)
    for _ in range(RAND_AUGMENT_OPS if policy == "ra" else 1):
        op = torch.randint(len(AUTO_AUGMENT_OPS), (n,), device=images.device, generator=generator)
        if policy == "ra":
            strength = torch.full((n,), RAND_AUGMENT_BIN / (AUTO_AUGMENT_BINS - 1), device=images.device)
        else:
            strength = torch.randint(AUTO_AUGMENT_BINS, (n,), device=images.device, generator=generator)
            strength = strength / (AUTO_AUGMENT_BINS - 1)
        sign = torch.where(torch.rand(n, device=images.device, generator=generator) < 0.5, -1.0, 1.0)
        images = colour_operations(images, op, strength, sign, AUTO_AUGMENT_RANGES[policy])
        theta = theta @ affine_matrix(op, strength * sign, AUTO_AUGMENT_RANGES[policy], images.shape[-1])
    grid = F.affine_grid(theta[:, :2], list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def affine_matrix(op, signed, ranges, side):
    """[N, 3, 3]: each image's shear, translation or rotation (identity for the other operations), in
    grid_sample's coordinates, which run from -1 to 1 across the (square) image. Shears are about the
    top-left corner, as torchvision's; rotations about the centre."""

    def amount(name, limit):
        return torch.where(op == AUTO_AUGMENT_OPS.index(name), signed * limit, 0.0)

    shear_x, shear_y = amount("shear_x", ranges["shear"]), amount("shear_y", ranges["shear"])
    pixels, share = ranges["translate"]
    to_grid = 2 * (pixels / side + share)  # a shift of the whole side is 2 in grid units
    shift_x, shift_y = amount("translate_x", to_grid), amount("translate_y", to_grid)
    angle = amount("rotate", math.radians(ranges["rotate"]))
    cos, sin, zero, one = angle.cos(), angle.sin(), torch.zeros_like(angle), torch.ones_like(angle)
    rows = [
        [cos, -sin + shear_x, shear_x + shift_x],
        [sin + shear_y, cos, shear_y + shift_y],
        [zero, zero, one],
    ]
    return torch.stack([torch.stack(row, 1) for row in rows], 1)


def colour_operations(images, op, strength, sign, ranges):
    """Each image's colour operation (the others pass through): brightness, color (saturation),
    contrast and sharpness blend with a degenerate image by a factor 1 + sign x strength x enhance;
    posterize keeps 8 down to ranges["bits"] bits; solarize inverts pixels at or above 1 - strength;
    autocontrast stretches each channel to [0, 1]; equalize flattens each channel's histogram."""

    def chosen(name):
        return (op == AUTO_AUGMENT_OPS.index(name))[:, None, None, None]

    factor = (1 + sign * strength * ranges["enhance"])[:, None, None, None]
    gray = _gray(images)
    for name, degenerate in (
        ("brightness", torch.zeros_like(images)),
        ("color", gray),
        ("contrast", gray.mean((2, 3), keepdim=True)),
        ("sharpness", _smoothed(images)),
    ):
        images = torch.where(chosen(name), (degenerate + factor * (images - degenerate)).clamp(0, 1), images)
    bits = (8 - (strength * (8 - ranges["bits"])).round())[:, None, None, None]
    step = 2 ** (8 - bits)
    images = torch.where(chosen("posterize"), (images * 255 / step).floor() * step / 255, images)
    threshold = (1 - strength)[:, None, None, None]
    images = torch.where(chosen("solarize") & (images >= threshold), 1 - images, images)
    low, high = images.amin((2, 3), keepdim=True), images.amax((2, 3), keepdim=True)
    stretched = torch.where(high > low, (images - low) / (high - low), images)
    images = torch.where(chosen("autocontrast"), stretched, images)
    return torch.where(chosen("equalize"), _equalized(images), images)


def _smoothed(images):
    """PIL's SMOOTH filter (torchvision's sharpness degenerate): 3x3, centre weight 5; the border kept."""
    kernel = torch.ones(3, 3, device=images.device)
    kernel[1, 1] = 5
    kernel = (kernel / kernel.sum()).expand(images.shape[1], 1, 3, 3)
    inner = F.conv2d(images, kernel, groups=images.shape[1])
    return torch.cat([images[..., :1, :], torch.cat([images[..., 1:-1, :1], inner, images[..., 1:-1, -1:]], 3),
                      images[..., -1:, :]], 2)  # fmt: skip


def _equalized(images):
    """Histogram equalisation of each channel of each image on 256 levels, as torchvision's equalize."""
    n, channels, height, width = images.shape
    levels = (images * 255).round().long().view(n * channels, -1)
    histogram = torch.zeros(n * channels, 256, dtype=torch.long, device=images.device)
    histogram.scatter_add_(1, levels, torch.ones_like(levels))
    # torchvision: the pixels of all levels but the highest present, in 255 steps
    step = (height * width - histogram.gather(1, levels.amax(1, keepdim=True))) // 255
    table = (histogram.cumsum(1) + step // 2) // step.clamp(min=1)
    table = F.pad(table, (1, 0))[:, :-1].clamp(0, 255)
    equalized = torch.where(step > 0, table.gather(1, levels), levels)
    return (equalized.float() / 255).view(n, channels, height, width)


def _beta(alpha, generator, device):
    """One draw of Beta(alpha, alpha) from the generator, on the device: X / (X + Y) of two gammas."""
    x, y = torch._standard_gamma(torch.full((2,), float(alpha), device=device), generator=generator)
    return x / (x + y)


def _cutmix_box(shape, lam, generator):
    """[H, W] bool mask of CutMix's box: centred at a random pixel, sides sqrt(1 - lam) of the image's."""
    rows, cols = (torch.arange(side, device=lam.device) for side in shape)
    inside = []
    for positions, side in ((rows, shape[0]), (cols, shape[1])):
        centre = (torch.rand((), device=lam.device, generator=generator) * side).floor()
        half = (0.5 * (1 - lam).sqrt() * side).floor()
        inside.append((positions >= centre - half) & (positions < (centre + half).clamp(max=side)))
    return inside[0][:, None] & inside[1][None, :]


def class_indices(spec, classes):
    """Class indices named by spec: 'none', 'all', a group of GROUPS, or comma-separated names."""
    # the word or the class: either would be a guess ('none', the default, is the word: off)
    if spec in ("all", *GROUPS) and spec in classes:
        meaning = "a group of classes" if spec in GROUPS else "every class"
        raise UserError(f"--targeted-augment {spec}: a class here is named {spec!r} too, the word for {meaning}; "
                        f"rename that class folder")  # fmt: skip
    if spec == "none":
        return []
    if spec == "all":
        return list(range(len(classes)))
    if spec in GROUPS:  # a group's classes that this data has
        names = [name for name in GROUPS[spec] if name in classes]
        if not names:
            raise UserError(f"the group {spec} ({', '.join(GROUPS[spec])}) has none of the classes {classes}; "
                            f"name classes, or edit data.GROUPS")  # fmt: skip
        return [classes.index(name) for name in names]
    names = spec.split(",")
    unknown = [name for name in names if name not in classes]
    if unknown:
        raise UserError(f"unknown class {unknown[0]!r}; use all, none, {', '.join(GROUPS)} or names from {classes}")
    return [classes.index(name) for name in names]


def group_of_classes(classes):
    """{group: [class indices]} when GROUPS names every class exactly once and every group has one,
    else None."""
    index = {name: i for i, name in enumerate(classes)}
    groups = {group: [index[c] for c in members if c in index] for group, members in GROUPS.items()}
    covered = sorted(i for members in groups.values() for i in members)
    return groups if covered == list(range(len(classes))) and all(groups.values()) else None


# ---------------------------------------------------------------------------------- folder listing and its checks


def is_cifar10_location(root):
    """The default ./data, a folder that holds CIFAR-10's files, or an empty one made for the download:
    a misspelled --data-dir is not taken as a place to download CIFAR-10 into."""
    if absolute(root) == absolute(DEFAULT_DATA_DIR):
        return True
    return root.is_dir() and (
        (root / "cifar-10-batches-py").is_dir()
        or (root / "cifar-10-python.tar.gz").is_file()
        or not any(root.iterdir())
    )


def load_cifar10(root, train):
    try:
        dataset = CIFAR10(root, train=train, download=False)
    except RuntimeError as error:  # not there yet, or damaged
        batches = root / "cifar-10-batches-py"
        if batches.is_dir() and not (root / "cifar-10-python.tar.gz").is_file():  # nothing to unpack it from again
            raise UserError(
                f"{batches} is incomplete or damaged (torchvision's checksums fail); replace it with a whole copy, "
                f"or remove it to download CIFAR-10 again"
            ) from error
        created = [folder for folder in (root, *root.absolute().parents) if not folder.exists()]
        try:
            dataset = CIFAR10(root, train=train, download=True)
        except Exception as error:
            if created:  # a failed download leaves none of the folders it made behind
                shutil.rmtree(created[-1], ignore_errors=True)
            raise UserError(
                f"CIFAR-10 is not in {root} and could not be downloaded ({error}). Offline, "
                f"pass --data-dir DIR where DIR/train/<class>/ holds the images (jpg, png, ...)."
            ) from error
    images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()
    return images, torch.tensor(dataset.targets), list(dataset.classes)


def list_folder(folder):
    """(paths, labels, class names) of folder/<class>/..., in torchvision ImageFolder's order (sorted
    folders, then sorted names), each image once (see find_images). Hidden folders (.ipynb_checkpoints)
    are not classes."""
    if not folder.is_dir():
        raise UserError(f"{folder} does not exist; expected {folder}/<class>/ folders of images")
    classes = class_folders(folder)
    if not classes:
        raise UserError(f"no class folders in {folder}; expected {folder}/<class>/ folders of images")
    real = {name: os.path.realpath(folder / name) for name in classes}
    twins = [(name, other) for name in classes for other in classes if name > other and real[name] == real[other]]
    if twins:
        raise UserError(f"class folder {folder / twins[0][0]} is a link to {folder / twins[0][1]}: the same images "
                        f"under two classes; remove one")  # fmt: skip
    seen = Seen({os.path.realpath(folder), *real.values()})
    for entry in os.scandir(folder):  # not classes: said
        if entry.name[0] == "." or not entry.is_dir():
            (seen.hidden if entry.name[0] == "." else seen.loose)[entry.path] = entry.path
    paths, labels = [], []
    for label, name in enumerate(classes):
        found = find_images(folder / name, seen)
        if not found:
            raise UserError(f"class folder {folder / name} holds no images; add some, or remove the folder")
        paths += found
        labels += [label] * len(found)
    seen.report(folder)
    return paths, torch.tensor(labels), classes


def class_folders(folder):
    """The sorted names of folder's subfolders, its classes; hidden ones (.ipynb_checkpoints) are none
    (list_folder counts them)."""
    return sorted(entry.name for entry in os.scandir(folder) if entry.is_dir() and entry.name[0] != ".")


def file_identity(path):
    """What makes two paths one file: its device and inode (symbolic and hard links alike), or for a
    broken link where it points (reached through a link to its folder, it is one link still)."""
    try:
        status = os.stat(path)
        return status.st_dev, status.st_ino
    except OSError:
        return os.path.realpath(path)


def special_file(path):
    """A FIFO, socket or device named like an image: no image, and reading a FIFO waits for a writer
    forever. A broken link is no special file: it is listed, and named as unreadable when read."""
    try:
        return not stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


class Seen:
    """What find_images met: the real folders entered and files taken, and what it passed over."""

    def __init__(self, folders=()):
        self.folders, self.files, self.links = set(folders), set(), 0
        self.others, self.hidden, self.loose, self.special = {}, {}, {}, {}  # {file or folder: its path}, once each

    def report(self, where):
        named = "; named outright, a file is read whatever its extension" if where == "--predict" else ""
        for passed, what, hint in ((self.others, "file(s) without an image extension (data.IMAGE_EXTENSIONS)", named),
                                   (self.hidden, "hidden file(s) and folder(s) (names starting with '.')", ""),
                                   (self.loose, "file(s) beside the class folders, in none of them", ""),
                                   (self.special, "FIFO(s), socket(s) or device(s), not image files", "")):  # fmt: skip
            if passed:
                LOG(f"{where}: skipped {len(passed)} {what}, e.g. {Path(min(passed.values())).name}{hint}")
        if self.links:
            LOG(f"{where}: skipped {self.links} link(s) or repeated path(s) to folders or images already listed; "
                f"each image is read once")  # fmt: skip


def find_images(folder, seen):
    """The image files under folder, sorted by folder, then name. Links are followed, but no folder is
    entered twice and no file taken twice (seen: a Seen, shared by the calls of one listing): a link
    loop would multiply a class's images onto both sides of the split. Hidden files and folders (.DS_Store,
    macOS's ._photo.jpg, .ipynb_checkpoints/) are passed over, as the shell's * does."""
    walk = []
    seen.folders.add(os.path.realpath(folder))  # a link inside it back to it is a loop (--predict DIR)
    for directory, subfolders, files in os.walk(folder, followlinks=True):
        kept = []
        for sub in subfolders:
            real = os.path.realpath(os.path.join(directory, sub))
            if sub[0] == ".":
                seen.hidden.setdefault(real, os.path.join(directory, sub))
                continue
            if real in seen.folders:  # a link to a folder listed already: a loop, or a second way in
                seen.links += 1
                continue
            seen.folders.add(real)
            kept.append(sub)
        subfolders[:] = sorted(kept)
        walk.append((directory, files))
    paths = []
    for directory, files in sorted(walk):
        for path in (os.path.join(directory, file) for file in sorted(files)):
            real = file_identity(path)
            if real in seen.files:  # listed already, or named outright (--predict)
                seen.links += 1
            elif os.path.basename(path)[0] == ".":
                seen.hidden.setdefault(real, path)
            elif not path.lower().endswith(IMAGE_EXTENSIONS):
                seen.others.setdefault(real, path)  # once, however often it is reached
            elif special_file(path):
                seen.special.setdefault(real, path)
            else:
                seen.files.add(real)
                paths.append(path)
    return paths


def one_class_error(folder, name):
    """A folder with one class would train a model that is always right: say what was probably meant."""
    inner = class_folders(folder / name)
    if len(inner) > 1:
        shown = ", ".join(inner[:3]) + (", ..." if len(inner) > 3 else "")
        return UserError(
            f"{folder} has one class folder, {name}, whose subfolders ({shown}) hold the images: they look like "
            f"the classes; move them directly under {folder}/ ({folder}/{inner[0]}/, ...)"
        )
    return UserError(f"{folder} has one class folder, {name}; a classifier needs two or more: add a folder per class")


def val_folder_in(root):
    """DIR/val/ (or valid/, validation/), with or without DIR/train/ beside it; None if none. Two of
    them are refused: either could be the one meant."""
    found = [Path(root) / name for name in VAL_FOLDERS if (Path(root) / name).is_dir()]
    if len(found) > 1:
        raise UserError(f"{root} has {' and '.join(f'{path.name}/' for path in found)}; keep one validation folder")
    return found[0] if found else None


def check_outside_splits(path, data_dirs, flag):
    """Refuse a path to write to inside the split folders (train/, test/, val/ ...) of data_dirs (None: none),
    where each folder is read as a class and each image as data: a cache, a run's folder or plots there
    would join the next training or evaluation."""
    splits = [Path(root) / name for root in data_dirs if root for name in SPLIT_FOLDERS]
    inside = [split for split in splits if Path(path).resolve().is_relative_to(split.resolve())]
    if inside:
        raise UserError(
            f"{flag} {path} is inside {inside[0]}, where each folder is read as a class; pass one outside it"
        )


def check_outside_states(folder, flag, given, states=()):
    """Refuse a folder to write in inside a run's resumable state (see run_state), or inside one of states (a
    new run's, not saved yet): what is written there would make the run unresumable."""
    folder = Path(absolute(folder))
    state = next((path for path in (folder, *folder.parents) if run_state(path)), None)
    state = state or next((path for path in states if folder.resolve().is_relative_to(Path(path).resolve())), None)
    if state:
        raise UserError(f"{flag} {given} is inside {state}, a run's resumable state; pass a folder outside it")


def run_state(path):
    """Whether path is a run's state folder: one its progress.json marks, or one of STATE_DIRS' names beside
    one (train.py makes state-tmp/ and state-old/ as it saves, and removes them)."""
    beside = path.name in STATE_DIRS and latest_state(path.parent) is not None
    return beside or (path / "progress.json").is_file()


def latest_state(out):
    """The run folder out's newest complete state folder, whichever point of save_state a crash stopped at."""
    return next((out / name for name in STATE_DIRS if (out / name / "progress.json").is_file()), None)


def check_held_out(paths, trained, folder, what):
    """Refuse held-out images (paths, of folder) that are also among the training images (trained: lists of
    paths): the same file by a link, or a copy of its bytes. Only files of a size both sides have are read."""
    trained = [path for paths in trained for path in paths]
    sizes = {path: (file_state(path) or (None,))[0] for path in [*paths, *trained]}
    common = ({sizes[path] for path in paths} & {sizes[path] for path in trained}) - {None}
    linked = set(map(file_identity, trained))
    copied = {file_digest(path) for path in trained if sizes[path] in common} - {None}
    shared = [
        path
        for path in paths
        if sizes[path] is not None  # a broken link is none: it is skipped, unread
        and (file_identity(path) in linked or sizes[path] in common and file_digest(path) in copied)
    ]
    if shared:
        raise UserError(
            f"{len(shared)} image(s) of {folder} are also training images (links to the same files, or copies), "
            f"e.g. {shared[0]}: {what} would measure images the network trained on; keep each image in one place"
        )


def file_digest(path):
    try:
        return hashlib.blake2b(Path(path).read_bytes(), digest_size=16).hexdigest()
    except OSError:  # unreadable: the decoder names it
        return None


def validation_folder_sources(data_dir, val_dir, items, labels, classes, max_train_samples, seed):
    """({part: (items, labels, positions)}, fingerprint) when DIR/val/ is the validation split: train/
    whole (or its subset), val/ whole. Refused: val/ with other classes, or images of train/."""
    val_items, val_labels, val_classes = list_folder(val_dir)
    if val_classes != classes:
        raise UserError(
            f"{val_dir} has the classes {val_classes} and train/ has {classes}; give both the same class folders"
        )
    check_held_out(val_items, [items], val_dir, "validation")
    train = training_subset(labels, torch.arange(len(labels)), max_train_samples, seed)
    if len(labels[train].unique()) < len(classes):  # only a subset can leave a class out
        raise UserError(
            f"--max-train-samples {max_train_samples} leaves a class without training images; "
            f"raise it (at least {len(classes)}, one image a class)"
        )
    sources = {"train": (items, labels, train), "val": (val_items, val_labels, torch.arange(len(val_labels)))}
    found = fingerprint(data_dir, items, torch.cat([labels, val_labels]), classes, val_items, val_dir.name)
    return sources, found


def check_classes(classes, expected, split_dir, advice):
    """A checkpoint's classes (expected) must be the split folder's, before anything is decoded."""
    if expected is not None and classes != expected:
        where = split_dir if Path(split_dir).is_dir() else Path(split_dir).parent  # CIFAR-10's own: its folder
        raise UserError(
            f"the checkpoint's classes {expected} differ from the class folders in {where}: {classes}; {advice}"
        )


def typical_side(items, sample=50):
    """The median shorter side of up to `sample` of a listing's images (list_images), read from their
    headers: tells CIFAR-sized and small images from photos before anything is decoded."""
    if isinstance(items, torch.Tensor):
        return IMAGE_SIZE  # CIFAR-10
    sides = []
    for path in items[:: max(1, len(items) // sample)]:
        try:
            with Image.open(path) as image:
                sides.append(min(image.size))
        except Exception:  # unreadable: decode names it
            pass
    return sorted(sides)[len(sides) // 2] if sides else IMAGE_SIZE


# ---------------------------------------------------------------------------------- splits and fingerprints


def stratified_split(labels, fraction, seed):
    """Split positions 0..len(labels)-1 into (rest, taken), taking `fraction` of every class.

    Depends only on labels, fraction and seed, so every machine and process count agrees."""
    generator = torch.Generator().manual_seed(seed)
    rest, taken = [], []
    for label in labels.unique():
        positions = (labels == label).nonzero().flatten()
        positions = positions[torch.randperm(len(positions), generator=generator)]
        n_taken = round(len(positions) * fraction)
        taken.append(positions[:n_taken])
        rest.append(positions[n_taken:])
    return torch.cat(rest).sort().values, torch.cat(taken).sort().values


def training_subset(labels, train, max_train_samples, seed):
    if max_train_samples and max_train_samples >= len(train):  # a cap, as in Hugging Face's scripts
        LOG(f"data: --max-train-samples {max_train_samples} is not below the {len(train)} training images: all used")
    elif max_train_samples:
        _, keep = stratified_split(labels[train], max_train_samples / len(train), seed)
        train = train[keep]
    return train


def train_val_indices(labels, classes, val_fraction, seed, max_train_samples=None):
    """The run's train and validation indices; the training part optionally cut to a stratified
    subset of about max_train_samples. Refuses a split that leaves a class without a training or
    a validation image."""
    train, val = stratified_split(labels, val_fraction, seed)
    subset = bool(max_train_samples and max_train_samples < len(train))
    train = training_subset(labels, train, max_train_samples, seed)
    counts = [torch.bincount(labels[part], minlength=len(classes)).tolist() for part in (train, val)]
    for name, n_train, n_val in zip(classes, *counts):
        if n_train and n_val:
            continue
        if n_val == 0:
            advice = "raise --val-fraction or add images of it"
        elif subset:
            advice = f"raise --max-train-samples (at least {len(classes)}, one image a class)"
        else:
            advice = "lower --val-fraction or add images of it"
        raise UserError(
            f"class {name!r} would have {n_train} training and {n_val} validation images "
            f"(--val-fraction {val_fraction}); {advice}"
        )
    return train, val


def fingerprint(data_dir, items, labels, classes, val_items=(), val_folder=None):
    """A small record of the data a run is split from, to check later that a folder still holds it:
    the images per class (labels: train/'s, and a validation folder's after them), and a hash of an
    image folder's listed images (items, and a validation folder's val_items) as relative paths and
    file sizes, sorted so that the order files are listed in does not matter; or of CIFAR-10's
    pixels and labels (items, from list_images). For an image folder also where validation comes
    from (val_folder: DIR/<val_folder>/, or None: cut from train/), a hash of the images' bytes (see
    file_bytes), and the same record of the validation folder alone ("val"): evaluate.py checks only
    those images, which train/ may change around (see validation_difference)."""
    counts = dict(zip(classes, torch.bincount(labels, minlength=len(classes)).tolist()))
    if isinstance(items, torch.Tensor):
        content = items.numpy().tobytes() + labels.numpy().tobytes()
        return {"sha256": hashlib.sha256(content).hexdigest()[:16], "images_per_class": counts}
    # train/'s paths relative to it, as before validation folders were read; val/'s relative to DIR, however
    # DIR is spelled (--data-dir . lists val/ as val/..., not ./val/...)
    root = Path(data_dir)
    named = [(path, path[len(str(root / "train")) :]) for path in items]
    named += [(path, f"/{val_folder}{path[len(str(root / val_folder)) :]}") for path in val_items]
    found = {"sha256": listing_hash(named), "images_per_class": counts, "val_folder": val_folder}
    found["bytes"], val_bytes = file_bytes([*items, *val_items], part=val_items)
    if val_items:
        val_counts = torch.bincount(labels[len(items) :], minlength=len(classes)).tolist()
        found["val"] = {
            "sha256": listing_hash(named[len(items) :]),
            "images_per_class": dict(zip(classes, val_counts)),
            "bytes": val_bytes,
        }
    return found


def listing_hash(named):
    """A hash of (path, name) pairs as names and file sizes, sorted: the order files are listed in does not matter."""
    content = "\n".join(
        sorted(
            f"{name}\0{os.stat(path).st_size if os.path.exists(path) else -1}"  # -1: a broken link
            for path, name in named
        )
    ).encode(errors="surrogateescape")  # a file name of other bytes than UTF-8 (an old zip's) too
    return hashlib.sha256(content).hexdigest()[:16]


def file_bytes(paths, part=()):
    """Hashes of the files' bytes, whole, in path order, of all paths and of those in part (a validation
    folder's, recorded alone): images swapped, replaced or edited keeping their names and sizes, which
    the listing's hash misses. It reads every byte once: CIFAR-10's 50,000 JPEGs (46 MB, in the page
    cache) took 0.3-0.4 s here beside a training run; a folder of large photos costs its read."""
    digests, part = (hashlib.blake2b(digest_size=8), hashlib.blake2b(digest_size=8)), set(part)
    for path in sorted(paths):  # all in data_dir: the order of their relative paths, wherever it is
        hashing = digests if path in part else digests[:1]
        try:
            with open(path, "rb") as file:
                while chunk := file.read(2**20):
                    for digest in hashing:
                        digest.update(chunk)
        except OSError:  # a broken link or an unreadable file: the decoder names it
            for digest in hashing:
                digest.update(b"\0")
    return tuple(digest.hexdigest() for digest in digests)


def data_difference(expected, found):
    """What differs between two fingerprints, in words; None when they match. Only what expected
    records is compared: a run's older fingerprint lacks the validation keys."""
    if all(found.get(key) == value for key, value in expected.items()):
        return None
    if not same_validation_source(expected, found):
        had, has = expected["val_folder"], found.get("val_folder")
        instead = f" (this folder has {has}/)" if has else ""
        return (f"the run validated on its {had}/ folder, which is not there{instead}" if had else
                f"the run cut its validation split from train/, and this folder has a {has}/ it never used: move "
                f"{has}/ out of it")  # fmt: skip
    had, has = expected["images_per_class"], found["images_per_class"]
    changes = [f"{name}: {has.get(name, 0)} images, the run had {n}" for name, n in had.items() if has.get(name) != n]
    changes += [f"{name}: a class the run did not have" for name in has if name not in had]
    if changes:
        together = f" (train/ and {expected['val_folder']}/ together)" if expected.get("val_folder") else ""
        return "; ".join(changes[:3]) + ("; ..." if len(changes) > 3 else "") + together
    if expected["sha256"] == found["sha256"]:
        return "the same file names and sizes, but other contents: images swapped or replaced"
    return "as many images per class, but other files or file sizes: images replaced, or another copy"


def validation_difference(expected, found):
    """data_difference for the validation images alone: a run validated on its val/ folder keeps its
    validation split whatever train/ holds now (val/ and train/ never share a file: load_split)."""
    if "val" in expected and same_validation_source(expected, found):
        difference = data_difference(expected["val"], found["val"])
        return difference and f"in {expected['val_folder']}/: {difference}"
    return data_difference(expected, found)


def same_validation_source(expected, found):
    """Whether the validation images come from the same place (DIR/val/, or cut from train/) as the
    run's did: only then can --skip-data-check evaluate images the run did not train on."""
    return "val_folder" not in expected or expected["val_folder"] == found.get("val_folder")


# ---------------------------------------------------------------------------------- decoding


def decode(items, labels, positions, side, named=5):
    """uint8 images [M, 3, side, side] and their labels, for the items at positions. CIFAR-10's are
    decoded already. Unreadable images are skipped and counted, so one bad file does not cost a run;
    the warning names the first `named` (None: all)."""
    if isinstance(items, torch.Tensor):
        return items[positions], labels[positions]
    paths = [items[i] for i in positions.tolist()]
    pixels = np.empty((len(paths), 3, side, side), dtype=np.uint8)
    readable = decode_into(paths, side, pixels)
    say_unreadable([path for path, ok in zip(paths, readable) if not ok], len(paths), named=named)
    if not readable.all():
        pixels = pixels[readable]
    return torch.from_numpy(pixels), labels[positions][torch.from_numpy(readable)]


def decode_into(paths, side, pixels):
    """Decode every path into pixels (uint8 [N, 3, side, side]: memory, or a cache file being written),
    with a progress bar; returns which could be read (bool [N]). Photos are decoded by a thread per
    core (PIL lets go of Python's lock while it decodes and resizes); small images in this thread, as
    Python's own work per image dominates them and threads would only wait for its lock."""
    readable = np.zeros(len(paths), dtype=bool)
    threads = 1 if side <= SMALL_SIDE else len(os.sched_getaffinity(0))
    pool = ThreadPoolExecutor(threads)
    images = (pool.map if threads > 1 else map)(read_image, paths, itertools.repeat(side))
    bar = tqdm(images, total=len(paths), desc="decoding", unit="img", leave=False, disable=None)  # None: a terminal
    try:
        for i, image in enumerate(bar):
            if image is not None:
                pixels[i] = image.transpose(2, 0, 1)  # PIL's height, width, channel -> channel first
                readable[i] = True
    finally:  # on Ctrl-C, drop the images not started: waiting for them all would look like a hang
        bar.close()
        pool.shutdown(wait=False, cancel_futures=True)
    return readable


# read_image skips these; "too large": over twice PIL's Image.MAX_IMAGE_PIXELS, a decompression bomb to PIL
UNREADABLE = "broken, not images, too large to open safely, or pixels with no fixed range: 32-bit, signed or float"


def say_unreadable(unreadable, count, where="", named=5):
    """The warning line that names the images that could not be read (the first `named`, None: all; a
    run's manifest.json lists them all); an error when none could."""
    if not unreadable:
        return
    if len(unreadable) == count:
        raise UserError(f"none of the {count} images{where}, e.g. {unreadable[0]}, could be read ({UNREADABLE})")
    names = ", ".join(unreadable[:named]) + (", ..." if len(unreadable[:named]) < len(unreadable) else "")
    LOG(f"warning: skipped {len(unreadable)} unreadable image(s){where} ({UNREADABLE}): {names}")


def read_image(path, side):
    """One image as uint8 [side, side, 3]: its shorter side resized to side (bicubic), then the centre
    side x side; None when it cannot be read (truncated, not an image, a decompression bomb, bad EXIF
    data: decoders raise OSError, ValueError, SyntaxError, struct.error and more), or its pixels have
    no fixed range (true_values, to_rgb)."""
    try:
        with Image.open(path) as image:
            image.draft("RGB", (side, side))  # JPEG: decode at a reduced scale when still large enough
            image = to_rgb(ImageOps.exif_transpose(true_values(image)))  # upright, as phones mark their photos
            short = min(image.size)
            if max(image.size) > 4 * short:  # a thin strip (1x30000): its centre square first, or the resize
                left, top = (image.width - short) // 2, (image.height - short) // 2  # below would take gigabytes
                image = image.crop((left, top, left + short, top + short))
            if image.size != (side, side):
                scale = side / min(image.size)
                width, height = max(side, round(image.width * scale)), max(side, round(image.height * scale))
                left, top = (width - side) // 2, (height - side) // 2
                image = image.resize((width, height), Image.BICUBIC).crop((left, top, left + side, top + side))
            return np.asarray(image)
    except Exception:
        return None


def true_values(image):
    """The image as its file means its pixels, where Pillow opens it otherwise: mode I (32-bit
    integers) whose file holds unsigned 16 bits or fewer is made I;16, the mode to_rgb reads 16-bit
    images from (Pillow before 11 opens 16-bit grayscale PNGs as I; every Pillow opens PGMs of over
    8 bits as I, scaled to 0..65535); a TIFF of 9 to 15 bits, which Pillow opens as I;16 with its own
    maximum (4095 for 12 bits), is scaled to 0..65535; a 16-bit TIFF whose black is its maximum
    (MinIsWhite) is inverted, as Pillow inverts 8-bit ones. A TIFF of signed or float samples
    (SampleFormat 2 or 3) has no fixed range: ValueError, even when Pillow opens it as 8-bit L."""
    tags = getattr(image, "tag_v2", {})
    formats = tags.get(339, ())  # SampleFormat, one per channel: 1 unsigned, 2 signed, 3 float
    if {2, 3} & set(formats if isinstance(formats, tuple) else (formats,)):
        raise ValueError("signed or float samples: no fixed range; save the image with unsigned 8 or 16 bits")
    if image.mode == "I" and len(image.tile) == 1:
        codec, _, _, raw = image.tile[0]
        raw = raw[0] if isinstance(raw, tuple) else raw
        if codec in ("ppm", "ppm_plain") or re.fullmatch(r"I;16[BLN]?", str(raw)):
            image = remade(image, np.asarray(image).astype(np.uint16))
    bits = tags.get(258, 16)  # BitsPerSample, one per channel
    top = 2 ** min(16, bits[0] if isinstance(bits, tuple) else bits) - 1
    minimum_is_white = tags.get(262) == 0  # PhotometricInterpretation 0
    if image.mode.startswith("I;16") and (top < 65535 or minimum_is_white):
        pixels = np.minimum(np.asarray(image).astype(np.uint32), top)
        pixels = top - pixels if minimum_is_white else pixels
        image = remade(image, (pixels * 65535 // top).astype(np.uint16))
    if image.mode == "RGB" and "transparency" in image.info and [tile[3] for tile in image.tile] == ["RGB;16B"]:
        image = transparent_rgb16(image)
    return image


def transparent_rgb16(image):
    """A 16-bit RGB PNG with a transparent colour as RGBA. Pillow opens it as 8-bit RGB (the high bytes)
    but keeps the colour in 16 bits, which no pixel then equals; the low bytes, decoded apart (the same
    data read as little-endian), make the exact 16-bit pixels to compare it with."""
    with Image.open(image.filename) as low:
        codec, extents, offset, _ = low.tile[0]
        low.tile = [(codec, extents, offset, "RGB;16L")]
        high = np.asarray(image)
        pixels = high.astype(np.uint16) << 8 | np.asarray(low)
    opaque = (pixels != np.array(image.info["transparency"], dtype=np.uint16)).any(-1)
    rgba = remade(image, np.dstack([high, np.where(opaque, 255, 0).astype(np.uint8)]))
    del rgba.info["transparency"]  # now in the alpha channel
    return rgba


def remade(image, pixels):
    """pixels as an image that keeps image's info: a PNG's transparent value, for to_rgb."""
    made = Image.fromarray(pixels)
    made.info = dict(image.info)
    return made


def to_rgb(image):
    """8-bit RGB with the image's true colours, whatever its mode; PIL's own conversion clips 16-bit
    pixels to 255 (all white) and 32-bit and float ones too (a float image of 0..1 reads black), so
    16-bit ones are scaled here and 32-bit ones refused (ValueError). Transparent pixels go onto
    TRANSPARENT_BACKGROUND (else they keep whatever colour hides under them); La is composited here."""
    if image.mode in ("I", "F"):
        raise ValueError(f"mode {image.mode}: 32-bit pixels have no fixed range; save the image with 8 or 16 bits")
    if image.mode.startswith("I;16"):
        pixels = np.asarray(image).astype(np.uint16)
        gray = Image.fromarray((pixels >> 8).astype(np.uint8))  # 0..65535 -> 0..255
        transparent = image.info.get("transparency")  # a PNG's one transparent 16-bit value
        alpha = Image.fromarray(np.where(pixels == transparent, 0, 255).astype(np.uint8))
        image = gray if transparent is None else Image.merge("LA", (gray, alpha))
    if image.mode == "La":
        luminance, alpha = np.asarray(image, dtype=np.float32).transpose(2, 0, 1)
        background = np.mean(TRANSPARENT_BACKGROUND)
        image = Image.fromarray(np.clip(luminance + (255 - alpha) * background / 255, 0, 255).round().astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA", "RGBa") or "transparency" in image.info:
        image = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", image.size, (*TRANSPARENT_BACKGROUND, 255)), image)
    return image.convert("RGB")


# ---------------------------------------------------------------------------------- the cache


# A cache is a folder <cache_dir>/<folder>-<side>px-<key>/ holding images.npy [N, 3, side, side],
# readable.npy [N] and manifest.json, built in a temporary folder and renamed into place: a build that
# is killed leaves nothing to be taken for a cache. The key hashes CACHE_VERSION, the side and every
# image's path and file_state: a changed folder, or an image replaced by another, gets a new cache.

CACHE_VERSION = 3  # raise it when read_image stores other pixels: old caches are then never read


TEMPORARY_BUILD = re.compile(r"(.+-\d+px-[0-9a-f]{16})\.tmp-\d+")  # <cache>.tmp-<pid>: see build_of
BUILD_FILES = ("images.npy", "readable.npy", "manifest.json")  # what build_cache writes, in this order


CACHE_RULE = "shorter side resized to the side (bicubic), centre square; EXIF upright; 8-bit RGB, transparent white"


class CacheUnavailable(Exception):
    """The cache cannot be written: a file in the way, no permission, or too little free space."""


def default_cache_dir():
    """$XDG_CACHE_HOME/resnet18-cifar10, else ~/.cache/resnet18-cifar10: not the data folder, which
    may be read-only or shared."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "resnet18-cifar10"


def cache_location(flag):
    """--cache-dir: a folder, 'none' (no cache: None), or not given (default_cache_dir)."""
    if flag == "none":
        return None
    if flag:
        check_outside_states(flag, "--cache-dir", flag)
    return Path(flag) if flag else default_cache_dir()


def cache_folder(paths, side, folder, cache_dir):
    key = hashlib.sha256(f"{CACHE_VERSION}\0{side}\0".encode())
    for path in paths:
        key.update(f"{absolute(path)}\0{file_state(path)}\n".encode(errors="surrogateescape"))
    folder = Path(absolute(folder))  # --data-dir .. names its folder, not '..'
    name = f"{folder.parent.name}-{folder.name}-{side}px-{key.hexdigest()[:16]}"
    return Path(cache_dir) / name


def file_state(path):
    """What changes whenever a file's bytes may have: its size, mtime, inode and ctime. The mtime alone
    is not enough: tar, zip and rsync -t restore it, so two images of one size swapped by mv keep their
    paths' sizes and mtimes; their inodes swap, and rename sets the ctime, which no tool can set back.
    None for a broken link."""
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_size, status.st_mtime_ns, status.st_ino, status.st_ctime_ns


def open_or_build_cache(paths, side, folder, cache_dir):
    """(pixels uint8 [N, 3, side, side] memory-mapped, readable bool [N], unreadable paths) of every
    path, from folder's cache in cache_dir, which is built first when missing or broken. A complete
    cache is only ever read, so it needs no lock, and a read-only one serves; one process builds a
    missing one while the others wait for its lock, then read it."""
    check_outside_splits(cache_dir, [Path(folder).parent], "--cache-dir")
    where = cache_folder(paths, side, folder, cache_dir)
    found = try_cache(where, len(paths), side, folder)
    if found:
        return found
    prepare_cache_dir(Path(cache_dir))
    with cache_lock(where):
        found = try_cache(where, len(paths), side, folder, quiet=True)  # built by another process meanwhile
        if found:
            return found
        shutil.rmtree(where, ignore_errors=True)  # broken, or left without its manifest
        build_cache(paths, side, folder, where)
    return open_cache(where, len(paths), side)


def try_cache(where, count, side, folder, quiet=False):
    """open_cache's result, or None when there is no complete cache at where (a broken one is said,
    unless quiet: the second look, under the lock, after the first has said it)."""
    if not (where / "manifest.json").is_file():
        return None
    try:
        found = open_cache(where, count, side)
    except (OSError, ValueError, KeyError, TypeError, EOFError) as error:
        if not quiet:
            LOG(f"warning: the cache {where} is broken ({error}); decoding again")
        return None
    LOG(f"data: {folder}: {count} images from the cache {where}")
    return found


def lock_file(path, wait=True):
    """An open file that holds path's lock (flock) until it is closed or the process ends, crashed or
    not; None when wait is False and another process holds it. Read access is enough, so a lock file
    left by another user serves."""
    try:
        handle = open(path, "a")
    except OSError:
        handle = open(path)
    try:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        return handle
    except BlockingIOError:
        handle.close()
        return None


@contextlib.contextmanager
def cache_lock(where, wait=True):
    """Hold where's lock file; yields False instead of waiting when wait is False and it is held."""
    try:
        handle = lock_file(f"{where}.lock", wait)
    except OSError as error:
        raise CacheUnavailable(f"cannot use the lock file {where}.lock ({error.strerror})") from error
    with handle or contextlib.nullcontext():
        yield handle is not None


def prepare_cache_dir(cache_dir):
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CacheUnavailable(f"--cache-dir {cache_dir} cannot be made ({error.strerror})") from error
    if not os.access(cache_dir, os.W_OK | os.X_OK):
        raise CacheUnavailable(f"--cache-dir {cache_dir} is not writable")


def build_of(name):
    """The cache a folder name is the temporary build of (build_cache names it <cache>.tmp-<pid>), or
    None. A complete cache's name ends in its key, so it is never taken for one, whatever the data
    folder is called (ds.tmp-1/ makes caches named ds.tmp-1-train-...)."""
    match = TEMPORARY_BUILD.fullmatch(name)
    return match and match[1]


def remove_stale_builds(where):
    """The temporary folders of builds that were killed: where's own (the caller holds its lock), and
    those of other caches whose lock nobody holds. A folder of such a name holding anything but a
    build's files (BUILD_FILES) is someone else's, and stays."""
    for temporary in where.parent.iterdir():
        key = build_of(temporary.name)
        if key is None or not temporary.is_dir() or not all(f.name in BUILD_FILES for f in temporary.iterdir()):
            continue
        if key == where.name:
            shutil.rmtree(temporary, ignore_errors=True)
            continue
        with cache_lock(where.parent / key, wait=False) as free:
            if free:
                shutil.rmtree(temporary, ignore_errors=True)


def cached_folder(path):
    """The folder whose images a complete cache at path holds (its manifest's), or None: another data set's
    caches may share a name's start (<parent>-<split>-<side>px-)."""
    try:
        return json.loads((path / "manifest.json").read_text()).get("folder")
    except (OSError, ValueError, AttributeError):
        return None


def build_cache(paths, side, folder, where):
    """Decode every path into a temporary folder beside where, then rename it into place. The pixel
    file's space is reserved first, so that a disk that fills up is an error, not a crash of the
    memory-mapped write."""
    remove_stale_builds(where)  # before measuring the free space they hold
    need = len(paths) * 3 * side * side
    free = shutil.disk_usage(where.parent).free
    if need > free:
        raise CacheUnavailable(
            f"the cache of {folder} needs {in_units(need)} and {where.parent} has {in_units(free)} free "
            f"(free space, or pass another --cache-dir)"
        )
    older = [path for path in where.parent.glob(f"{where.name[:-16]}*") if not build_of(path.name)]
    older = [path for path in older if cached_folder(path) == str(Path(folder).absolute())]
    temporary = Path(f"{where}.tmp-{os.getpid()}")
    started = time.perf_counter()
    try:
        temporary.mkdir()
        pixels = np.lib.format.open_memmap(temporary / "images.npy", "w+", np.uint8, (len(paths), 3, side, side))
        with open(temporary / "images.npy", "r+b") as file:
            os.posix_fallocate(file.fileno(), 0, os.fstat(file.fileno()).st_size)
        readable = decode_into(paths, side, pixels)
        pixels.flush()
        del pixels
        np.save(temporary / "readable.npy", readable)
        unreadable = [path for path, ok in zip(paths, readable) if not ok]
        manifest = dict(
            version=CACHE_VERSION, key=where.name, folder=str(Path(folder).absolute()), side=side,
            rule=CACHE_RULE, images=len(paths), unreadable=unreadable,
        )  # fmt: skip
        (temporary / "manifest.json").write_text(json.dumps(manifest, indent=1))
        for name in BUILD_FILES:  # on disk before the rename says complete
            with open(temporary / name, "rb") as file:
                os.fsync(file.fileno())
        os.rename(temporary, where)
    except OSError as error:
        raise CacheUnavailable(f"could not write the cache {where} ({error.strerror or error})") from error
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    seconds = time.perf_counter() - started
    LOG(f"data: {folder}: decoded {len(paths)} images in {seconds:.1f}s into the cache {where}")
    if older:
        size = sum(file.stat().st_size for path in older for file in path.iterdir())
        LOG(f"data: {len(older)} older cache(s) of {folder} ({in_units(size)}) stay in {where.parent}; "
            f"remove them if they are of no more use")  # fmt: skip


def in_units(size):
    return f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


def open_cache(where, count, side):
    manifest = json.loads((where / "manifest.json").read_text())
    pixels = np.load(where / "images.npy", mmap_mode="c")  # copy-on-write: shared pages, and a writable array
    readable = np.load(where / "readable.npy")
    if pixels.shape != (count, 3, side, side) or readable.shape != (count,) or manifest["images"] != count:
        raise ValueError(f"it holds {pixels.shape[0]} images of {pixels.shape[1:]}, not {count} of (3, {side}, {side})")
    unreadable = manifest["unreadable"]
    if not isinstance(unreadable, list) or len(unreadable) != count - readable.sum():
        raise ValueError("its manifest does not list the unreadable images")
    return torch.from_numpy(pixels), torch.from_numpy(readable), unreadable


# ---------------------------------------------------------------------------------- memory placement


def check_memory(count, side, device=None, advice=TRAINING_ADVICE, reserved=0):
    """Refuse, before decoding, images that would not fit comfortably: with `reserved` bytes more, at
    most MEMORY_SHARE of the free memory, and of the free GPU memory for a GPU."""
    need = count * 3 * side * side + reserved
    free = {"memory": available_memory()}
    if device is not None and torch.device(device).type == "cuda":
        free["GPU memory"] = torch.cuda.mem_get_info(device)[0]
    for where, available in free.items():
        if available is not None and need > MEMORY_SHARE * available:
            raise UserError(
                f"{count} images at {side}x{side}{' and training' if reserved else ''} need "
                f"{need / 2**30:.2f} GiB in {where}, more than "
                f"{MEMORY_SHARE:.0%} of the {available / 2**30:.2f} GiB free; {advice}"
            )


def available_memory():
    """Bytes of memory free for new allocations (Linux's MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as file:
            fields = dict(line.split(":", 1) for line in file)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def place_data(data_on, cached, cache_dir, subset, sources, parts, side, device, reserved):
    """Where the splits are held: "device" (in memory, checked to fit) or "disk" (the cache, read
    batch by batch); "auto" is device when the images fit the memory check, else disk."""
    count = sum(len(sources[part][2]) for part in parts)
    advice = TRAINING_ADVICE if "train" in parts else "free memory first"
    if data_on != "device" and not cached:
        if data_on == "disk" and cache_dir is None:
            raise UserError("--data-on disk reads batches from the cache; drop --cache-dir none")
        if data_on == "disk":
            why = "--max-train-samples decodes its subset without one" if subset else "CIFAR-10 is in memory, no cache"
            raise UserError(f"--data-on disk reads batches from the cache, and {why}; pass --data-on auto or device")
        data_on = "device"
    if data_on == "auto":
        try:
            check_memory(count, side, device, reserved=reserved)
            data_on = "device"
        except UserError:
            data_on = "disk"
            LOG(f"data: {count} images at {side}x{side} do not fit in memory; training reads them from the cache")
    if data_on == "device":
        check_memory(count, side, device, f"pass --data-on disk, or {advice}" if cached else advice, reserved)
    return data_on


def load_part(items, labels, positions, side, folder, cache_dir, opened, on_disk=False):
    """A Split of the items at positions: decoded into memory, or (cache_dir) rows of folder's cache,
    built first when there is none (opened: the caches opened so far, by folder). A cache that cannot
    be written costs only the cache: the images are decoded into memory, as said in a warning;
    unless they are to be read from disk (on_disk), which then cannot be."""
    if cache_dir is not None and folder not in opened:
        try:
            opened[folder] = open_or_build_cache(items, side, folder, cache_dir)
            say_unreadable(opened[folder][2], len(items), f" of {folder}")
        except CacheUnavailable as why:
            if on_disk:
                raise UserError(
                    f"{why}, and --data-on disk reads batches from a cache there; pass a writable --cache-dir, or "
                    f"--data-on device to decode the images into memory"
                ) from None
            LOG(f"warning: {why}; decoding into memory, without a cache")
            opened[folder] = None
    if cache_dir is None or opened[folder] is None:
        started = time.perf_counter()
        split = Split(*decode(items, labels, positions, side))
        if not isinstance(items, torch.Tensor):
            LOG(f"data: {folder}: decoded {len(positions)} images in {time.perf_counter() - started:.1f}s, no cache")
        return split
    pixels, readable, _ = opened[folder]
    keep = positions[readable[positions]]
    return Split(pixels, labels[keep], rows=keep)


# ---------------------------------------------------------------------------------- errors and the console


class UserError(Exception):
    """A problem with the user's input or files. Each script's main() prints it as one `error:` line
    and exits non-zero; library code raises it so that a notebook importing this module survives."""


def parser_of(description, flags):
    """A script's argparse parser, from its table of flags ((flag, argparse's settings, help) rows), its
    refusals made one line like every other bad input's: argparse prints its whole usage block first,
    which buries the line that says what is wrong."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, settings, text in flags:
        parser.add_argument(flag, help=text, **settings)

    def error(message):
        parser.exit(2, f"error: {message} ({parser.prog} --help lists the flags)\n")

    parser.error = error
    return parser


def refuse(parser, args, refusals):
    """parser.error, one line, for the first of refusals that applies: (refused when, message), each a
    function of args, the message also a plain string."""
    for refused, message in refusals:
        if refused(args):
            parser.error(message(args) if callable(message) else message)


def bounded(kind, low, high=math.inf, open_low=False, open_high=False):
    """An argparse type: a finite number of `kind` between low and high (either end excluded if open).
    Integers stop at 2**53, the largest a float holds exactly: the code mixes them with floats (time
    estimates, fractions), and a 309-digit one overflowed there."""
    word = "an integer" if kind is int else "a number"
    span = f"{'above' if open_low else 'at least'} {low}"
    if high < math.inf:
        span += f" and {'below' if open_high else 'at most'} {high}"
    capped = kind is int and high == math.inf
    high = 2**53 if capped else high

    def parse(text):
        digits = text.strip().lstrip("+-")
        if "_" in text or (kind is int and digits.isdecimal() and len(digits) > 16):  # int() of 4,300 digits fails
            value = None if "_" in text else math.inf
        else:
            try:
                value = kind(text)
            except ValueError:
                value = None
        if value is None:
            raise argparse.ArgumentTypeError(f"{text!r} is not {word}")
        above_low = low < value if open_low else low <= value
        below_high = value < high if open_high else value <= high
        if not ((kind is int or math.isfinite(value)) and above_low and below_high):
            limit = f" and at most {high}" if capped and above_low else ""
            raise argparse.ArgumentTypeError(f"must be {word} {span}{limit}, got {text}")
        return value

    return parse


def absolute(path):
    """path from the root, as the system reaches it: a `..` after a link goes up from the link's target
    (os.path.abspath would drop the link as text, and name another folder); without `..`, links stay as typed."""
    return os.path.realpath(path) if ".." in Path(path).parts else os.path.abspath(path)


def path_flag(text, wanted="a path"):
    """An argparse type for file and folder flags: an empty value (an unset shell variable, as in
    --data-dir "$DATA") or a blank one is refused, not taken as the current folder or a default."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"is {'blank' if text else 'empty'} (an unset shell variable?); pass {wanted}")
    return text


def classes_flag(text):
    """An argparse type for class names (--targeted-augment): refused as the command line is read, not
    after the data, when empty, blank, with an empty name in its list ('cat,') or a name twice."""
    path_flag(text, "none, all, a group or class names")
    names = text.split(",")
    if "" in names:
        raise argparse.ArgumentTypeError(f"{text!r} holds an empty class name; separate the names by single commas")
    twice = [name for name in names if names.count(name) > 1]
    if twice:
        raise argparse.ArgumentTypeError(f"{text!r} names {twice[0]!r} twice; name each class once")
    return text


class QuietConsole:
    """sys.stdout or sys.stderr that goes quiet when its reader has gone (`| head`, a closed terminal),
    instead of raising BrokenPipeError from the next print: the run goes on, and the files the user
    asked for are still written."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        try:
            return self.stream.write(text)
        except BrokenPipeError:
            self.silence()
            return len(text)
        except UnicodeEncodeError:  # a file name of other bytes than the console's encoding: shown escaped
            return self.write(text.encode(self.stream.encoding, "backslashreplace").decode(self.stream.encoding))

    def flush(self):
        try:
            self.stream.flush()
        except BrokenPipeError:
            self.silence()

    def silence(self):
        """Point the stream's file descriptor at /dev/null: what is still buffered, and whatever is
        printed later, goes there."""
        os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())

    def __getattr__(self, name):
        return getattr(self.stream, name)


@contextlib.contextmanager
def quiet_when_closed():
    """The scripts' console inside main(): see QuietConsole. Once silenced, a stream's descriptor stays
    on /dev/null, so the interpreter's last flush at exit finds no closed pipe either."""
    console = sys.stdout, sys.stderr
    # a stream closed from the start (`2>&-`) is None, and /dev/null here
    sys.stdout, sys.stderr = (QuietConsole(stream or open(os.devnull, "w")) for stream in console)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = console
