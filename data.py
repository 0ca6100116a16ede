"""Data: CIFAR-10 or an image folder held in memory, the train/validation split, and augmentation.

The whole dataset is decoded once into a single uint8 tensor (50,000 CIFAR images are 150 MB).
Batches are sliced from it and augmented as whole batches on the training device, each sample with
its own random numbers, so no per-sample Python runs in the training loop.
"""

import hashlib
import math
import os
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.datasets import CIFAR10, DatasetFolder

IMAGE_SIZE = 32  # images of any other size are resized to this when loaded
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

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


class UserError(Exception):
    """A problem with the user's input or files. Each script's main() prints it as one `error:` line
    and exits non-zero; library code raises it so that a notebook importing this module survives."""


# ---------------------------------------------------------------------------------- loading


def load_images(data_dir, split):
    """Return (images uint8 [N, 3, H, W], labels int64 [N], class names) for split 'train' or 'test'.

    An image folder when data_dir has a train/ folder, else torchvision's CIFAR-10 (downloaded if
    missing)."""
    root = Path(data_dir)
    if root.exists() and not root.is_dir():
        raise UserError(f"--data-dir {root} is a file; pass a folder")
    if (root / "train").is_dir():
        return load_image_folder(root / split)
    if any(child.is_dir() and child.name != "cifar-10-batches-py" for child in root.glob("*")):
        raise UserError(
            f"--data-dir {root} has folders but no train/ folder; for your own images pass the folder that "
            f"holds train/<class>/ (not train/ itself), for CIFAR-10 a folder of its own"
        )
    return load_cifar10(root, train=split == "train")


def load_cifar10(root, train):
    try:
        dataset = CIFAR10(root, train=train, download=False)
    except RuntimeError:  # not there yet
        created = [folder for folder in (root, *root.absolute().parents) if not folder.exists()]
        try:
            dataset = CIFAR10(root, train=train, download=True)
        except Exception as error:
            if created:  # a failed download leaves none of the folders it made behind
                shutil.rmtree(created[-1], ignore_errors=True)
            raise UserError(
                f"CIFAR-10 is not in {root} and could not be downloaded ({error}). Offline, "
                f"pass --data-dir DIR where DIR/train/<class>/ holds the images (png or jpg)."
            ) from error
    images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()
    return images, torch.tensor(dataset.targets), list(dataset.classes)


def load_image_folder(folder):
    """Decode every image under folder/<class>/ into one tensor. Unreadable images are skipped and
    counted, so one bad file does not cost a run; the count is printed."""
    if not folder.is_dir():
        raise UserError(f"{folder} does not exist; expected {folder}/<class>/*.png|jpg")
    try:
        listing = ClassFolders(folder, loader=str, extensions=IMAGE_EXTENSIONS)
    except (FileNotFoundError, RuntimeError) as error:
        raise UserError(f"no images in {folder} ({error}); expected {folder}/<class>/*.png|jpg") from error
    images, labels, skipped = [], [], []
    for path, label in listing.samples:
        try:
            with Image.open(path) as image:
                image = to_rgb(image)
                if image.size != (IMAGE_SIZE, IMAGE_SIZE):
                    image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)
                images.append(np.asarray(image))
        except (OSError, Image.DecompressionBombError):  # truncated, unidentifiable, or far too large
            skipped.append(path)
            continue
        labels.append(label)
    if skipped:
        print(f"warning: skipped {len(skipped)} unreadable image(s) in {folder}, e.g. {skipped[0]}")
    if not images:
        raise UserError(f"none of the images in {folder} could be read")
    images = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return images, torch.tensor(labels), list(listing.classes)


class ClassFolders(DatasetFolder):
    """torchvision's folder listing, without hidden folders (.ipynb_checkpoints, .cache) as classes."""

    def find_classes(self, directory):
        classes = sorted(entry.name for entry in os.scandir(directory) if entry.is_dir() and entry.name[0] != ".")
        if not classes:
            raise FileNotFoundError(f"no class folders in {directory}")
        return classes, {name: index for index, name in enumerate(classes)}


def to_rgb(image):
    """8-bit RGB with the image's true pixel values. PIL opens 16-bit grayscale PNGs as 32-bit integer
    images, and its RGB conversion clips those to 255 (all white): scale them to 8 bits first."""
    if image.mode.startswith("I"):
        pixels = np.asarray(image, dtype=np.uint32) >> 8  # 0..65535 -> 0..255
        image = Image.fromarray(pixels.astype(np.uint8))
    return image.convert("RGB")


def fingerprint(data_dir, split, images, labels, classes):
    """A small record of the data a split is made from, to check later that a folder still holds
    it: the images per class, and a hash of an image folder's relative paths and file sizes (sorted,
    so the order files are listed in does not matter), or of CIFAR-10's pixels and labels."""
    folder = Path(data_dir) / split
    if (Path(data_dir) / "train").is_dir():  # an image folder, as load_images decides
        prefix = len(str(folder))
        content = "\n".join(
            sorted(
                f"{path[prefix:]}\0{os.stat(path).st_size if os.path.exists(path) else -1}"  # -1: a broken link
                for name in classes
                for directory, _, files in os.walk(folder / name, followlinks=True)
                for path in (os.path.join(directory, file) for file in files)
                if path.lower().endswith(IMAGE_EXTENSIONS)
            )
        ).encode()
    else:
        content = images.numpy().tobytes() + labels.numpy().tobytes()
    counts = torch.bincount(labels, minlength=len(classes)).tolist()
    return {"sha256": hashlib.sha256(content).hexdigest()[:16], "images_per_class": dict(zip(classes, counts))}


def data_difference(expected, found):
    """What differs between two fingerprints, in words; None when they match."""
    if expected == found:
        return None
    had, has = expected["images_per_class"], found["images_per_class"]
    changes = [f"{name}: {has.get(name, 0)} images, the run had {n}" for name, n in had.items() if has.get(name) != n]
    changes += [f"{name}: a class the run did not have" for name in has if name not in had]
    if changes:
        return "; ".join(changes[:3]) + ("; ..." if len(changes) > 3 else "")
    return "as many images per class, but other files or file sizes: images replaced, or another copy"


# ---------------------------------------------------------------------------------- splits


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


def train_val_indices(labels, classes, val_fraction, seed, max_train_samples=None):
    """The run's train and validation indices; the training part optionally cut to a stratified
    subset of about max_train_samples. Refuses a split that leaves a class without a training or
    a validation image."""
    train, val = stratified_split(labels, val_fraction, seed)
    subset = bool(max_train_samples and max_train_samples < len(train))
    if subset:
        _, keep = stratified_split(labels[train], max_train_samples / len(train), seed)
        train = train[keep]
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


# ---------------------------------------------------------------------------------- batches


class TensorDataset(torch.utils.data.Dataset):
    """Images and labels as tensors. DataLoader fetches a whole batch with one indexing call
    (__getitems__), and accelerate still shards, pads and skips batches as for any dataset."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return self.images[index], self.labels[index]

    def __getitems__(self, indices):
        index = torch.tensor(indices)
        if self.labels.is_cuda:  # from pinned memory the copy is queued, instead of waiting for the GPU
            index = index.pin_memory()
        index = index.to(self.labels.device, non_blocking=True)
        return self.images[index], self.labels[index]


def _keep_batch(batch):
    return batch  # __getitems__ already returns a stacked batch


def make_loader(images, labels, batch_size, shuffle, drop_last=False):
    return torch.utils.data.DataLoader(
        TensorDataset(images, labels),
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        collate_fn=_keep_batch,
    )


# ---------------------------------------------------------------------------------- augmentation


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
    """Zero one random rectangle per image with the given probability (torchvision's defaults)."""
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


def targeted_augment(images, generator):
    """The seed write-up's augmentation for hard classes: rotation, colour jitter, erasing."""
    images = rotate(images, ROTATION_DEGREES, generator)
    images = color_jitter(images, JITTER, generator)
    return random_erase(images, ERASE_PROBABILITY, generator)


def augment(images, labels, generator, padding=4, targeted_labels=None):
    """uint8 batch -> float batch in [0, 1]: crop and flip for all; the targeted augmentation for
    samples whose label is in targeted_labels (a tensor of class indices)."""
    images = random_crop_flip(images, padding, generator).float().div_(255)
    if targeted_labels is not None and len(targeted_labels):
        chosen = torch.isin(labels, targeted_labels)
        # Augment the whole batch and keep the chosen rows: fixed shapes, no host sync.
        images = torch.where(chosen[:, None, None, None], targeted_augment(images, generator), images)
    return images


def normalizer(mean, std, size, device):
    """A function: uint8 or [0, 1] float batch -> normalised float batch of size x size pixels,
    channels_last. Its constants are put on the device here, once: made from the tuples for every
    batch, they would be two blocking host-to-device copies per step on a GPU."""
    mean = torch.tensor(mean, device=device)[:, None, None]
    std = torch.tensor(std, device=device)[:, None, None]

    def normalize(images):
        if images.dtype == torch.uint8:
            images = images.float().div_(255)
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=size < images.shape[-1])
        return ((images - mean) / std).contiguous(memory_format=torch.channels_last)

    return normalize


def class_indices(spec, classes):
    """Class indices named by spec: 'none', 'all', a group of GROUPS, or comma-separated names."""
    if spec == "none":
        return []
    if spec == "all":
        return list(range(len(classes)))
    names = GROUPS.get(spec, spec.split(","))
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
