"""Small, self-made data for the tests: an image folder, a fake CIFAR-10 in torchvision's on-disk
format, and a local ResNet18 weights file. Nothing is downloaded and ../shared is never read."""

import atexit
import os
import pickle
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

# The tests' models are tiny: one thread each keeps them fast, also beside other work on the machine
# (two processes spinning two OpenMP threads each on two cores run many times slower).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
# Decoded image folders are cached under $XDG_CACHE_HOME: the tests' own, never the user's, removed at the end.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="resnet18-tests-cache-")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], ignore_errors=True)
sys.path.insert(0, str(ROOT))

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def class_images(label, count, rng):
    """32x32 RGB images whose colour depends on the class, plus noise: learnable, but not trivially."""
    base = np.array([label * 25, 255 - label * 25, (label * 70) % 256], dtype=np.float32)
    noise = rng.normal(0, 40, size=(count, 32, 32, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """DIR/train/<class>/*.png (20 per class) and DIR/test/<class>/*.jpg (5 per class)."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for split, count, ext in (("train", 20, "png"), ("test", 5, "jpg")):
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i, pixels in enumerate(class_images(label, count, rng)):
                Image.fromarray(pixels).save(folder / f"{i:04d}.{ext}")
    return root


@pytest.fixture(scope="session")
def fake_cifar(tmp_path_factory):
    """A tiny CIFAR-10 in torchvision's python-pickle format (cifar-10-batches-py/)."""
    root = tmp_path_factory.mktemp("cifar")
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(1)

    def write(name, per_class):
        labels = [label for label in range(10) for _ in range(per_class)]
        pixels = np.concatenate([class_images(label, per_class, rng) for label in range(10)])
        batch = {"data": pixels.transpose(0, 3, 1, 2).reshape(len(labels), -1), "labels": labels}
        (folder / name).write_bytes(pickle.dumps(batch))

    for i in range(1, 6):
        write(f"data_batch_{i}", 2)
    write("test_batch", 3)
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": CLASSES}))
    return root


@pytest.fixture
def trust_fake_cifar(monkeypatch):
    """torchvision checks CIFAR-10's files against the real MD5 sums; accept the fake ones."""
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: True)


@pytest.fixture(scope="session")
def weights_file(tmp_path_factory):
    """A local ResNet18 state dict with torchvision's key names and a 1000-class head."""
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.manual_seed(123)
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return path


def quick_args(data_dir, out, *extra):
    """Flags for a run that takes seconds: tiny model input (32x32 through torchvision's stem), 50 of the
    160 training images (3 steps an epoch), all 40 validation images."""
    flags = ["--weights", "none", "--stem", "imagenet", "--input-size", "32", "--batch-size", "16", "--epochs", "2"]
    return [
        "--data-dir",
        str(data_dir),
        "--output-dir",
        str(out),
        *flags,
        "--max-train-samples",
        "48",
        *map(str, extra),
    ]


def run_script(*args, env=None, timeout=300):
    """Run a command in the repository root, as a user would; return the CompletedProcess."""
    environment = os.environ | {"PYTHONUNBUFFERED": "1"} | (env or {})
    return subprocess.run(args, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=timeout)


def free_port():
    """A port no one listens on now: the default 29500 may be held by any other job on the machine."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(processes=1, *flags):
    """`accelerate launch` with these flags; several processes talk on a free port of their own."""
    command = [sys.executable, "-m", "accelerate.commands.launch", *map(str, flags)]
    if processes > 1:
        command += ["--multi_gpu", "--num_processes", str(processes), "--main_process_port", str(free_port())]
    return command


def both_ranks(result):
    """A launch's whole output, for a failed assertion: each rank's lines are in it, wherever they are."""
    return f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"


@pytest.fixture(scope="session")
def two_process_run(image_folder, tmp_path_factory):
    """One epoch of 2 CPU processes on one machine (accelerate launch --multi_gpu), shared by the tests
    of several processes and several machines, which read it: (its folder, the CompletedProcess)."""
    out = tmp_path_factory.mktemp("ddp") / "ddp"
    return out, run_script(*launch(2), "train.py", *quick_args(image_folder, out, "--epochs", "1"))


@pytest.fixture(scope="session")
def trained_run(image_folder, tmp_path_factory):
    """One finished 2-epoch run on the image folder, shared by the evaluation tests."""
    import train

    out = tmp_path_factory.mktemp("run") / "run"
    train.main(quick_args(image_folder, out, "--input-size", train.IMAGENET_STEM_INPUT_SIZE))  # evaluate resizes
    return out
