"""Training and evaluation throughput on this machine, side by side, in one run.

    python bench/throughput.py                   # 40,000 training images, as a real run
    python bench/throughput.py --images 8000     # quicker

Rows:
- bare step: forward + backward + SGD on one batch already in memory (the ceiling for any loop);
- train.py: whole training epochs of `train.py --recipe seed` (data, augmentation, step,
  logging; validation excluded), as history.json records them;
- plain loop: what users usually write: torchvision's ImageFolder with per-sample transforms, a
  DataLoader with 2 workers, NCHW, eager, the same recipe and split. Both report the validation
  accuracy they reach, to show the speed costs no accuracy;
- evaluation: evaluate.py's forward passes over 10,000 images.
Data: the shared CIFAR-10 JPEGs (../shared/data) when present, else random 32x32 images of the
same shape written to a temporary folder. Model: ResNet18 with torchvision's stem, from scratch,
float32, batch 128, on the CPU threads torch uses here.
"""

import argparse
import json
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
import torchvision.transforms as T
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import evaluate  # noqa: E402
import train  # noqa: E402
from model import build_model  # noqa: E402

SHARED = ROOT.parent / "shared" / "data" / "cifar10-jpeg-train.tar.gz"
BATCH = 128


def prepare_data(folder, images):
    """The shared JPEGs, or random images in the same layout (train/<class>/NNNN.jpg)."""
    if SHARED.is_file():
        with tarfile.open(SHARED) as archive:
            archive.extractall(folder, filter="data")
        return "shared CIFAR-10 JPEGs"
    rng = np.random.default_rng(0)
    per_class = max(1, images // 8 + 1)  # 10 classes, 80% kept for training
    for label in range(10):
        (folder / "train" / f"class{label}").mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / "train" / f"class{label}" / f"{i:04d}.jpg")
    return "generated random JPEGs"


def bare_step(batch_size, channels_last, steps, compile=False):
    """Images/s of forward + backward + SGD on a fixed in-memory batch."""
    model = build_model(10, stem="imagenet", weights="none")
    inputs, labels = torch.randn(batch_size, 3, 32, 32), torch.randint(0, 10, (batch_size,))
    if channels_last:
        model, inputs = (
            model.to(memory_format=torch.channels_last),
            inputs.contiguous(memory_format=torch.channels_last),
        )
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    forward = torch.compile(model) if compile else model

    def step():
        loss = torch.nn.functional.cross_entropy(forward(inputs), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    started = time.perf_counter()
    step()
    step()  # warm-up (and compilation)
    warmup = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch_size / (time.perf_counter() - started), warmup


def train_py_run(folder, images, epochs, out):
    """Images/s of train.py's training epochs, as history.json records them, and its final
    validation accuracy."""
    train.main(["--data-dir", str(folder), "--recipe", "seed", "--weights", "none", "--epochs", str(epochs),
                "--max-train-samples", str(images), "--output-dir", str(out)])  # fmt: skip
    _, labels, _ = data.load_images(folder, "train")
    n_train = len(data.train_val_indices(labels, 0.2, 0, images)[0])
    history = json.loads((out / "history.json").read_text())
    seconds = sum(record["seconds"] for record in history) / epochs
    return n_train / seconds, n_train, seconds, history[-1]["val_acc"]


def plain_loop(folder, images, epochs):
    """The loop most tutorials show, on the same split and recipe as train.py --recipe seed.
    Returns (training images/s, validation accuracy)."""
    normalize = [T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)]
    augment = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), *normalize])
    dataset = torchvision.datasets.ImageFolder(folder / "train", transform=augment)
    train_idx, val_idx = data.train_val_indices(torch.tensor(dataset.targets), 0.2, 0, images)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, train_idx.tolist()), batch_size=BATCH, shuffle=True, num_workers=2
    )
    model = build_model(10, stem="imagenet", weights="none")
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    started = time.perf_counter()
    for _ in range(epochs):
        for inputs, targets in loader:
            loss = torch.nn.functional.cross_entropy(model(inputs), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    speed = epochs * len(train_idx) / (time.perf_counter() - started)
    plain = torchvision.datasets.ImageFolder(folder / "train", transform=T.Compose(normalize))
    val_loader = torch.utils.data.DataLoader(torch.utils.data.Subset(plain, val_idx.tolist()), batch_size=1024)
    model.eval()
    with torch.inference_mode():
        correct = sum((model(inputs).argmax(1) == targets).sum().item() for inputs, targets in val_loader)
    return speed, correct / len(val_idx)


def evaluation_seconds(count=10_000):
    model = build_model(10, stem="imagenet", weights="none")
    images = torch.randint(0, 256, (count, 3, 32, 32), dtype=torch.uint8)
    metadata = {"mean": data.CIFAR10_MEAN, "std": data.CIFAR10_STD}
    started = time.perf_counter()
    evaluate.predict(model, images, metadata, 1024, tta=False, device=torch.device("cpu"))
    return time.perf_counter() - started


def arithmetic_ceiling():
    """Images/s if every training FLOP ran at the speed of a large float32 matmul."""
    model = build_model(10, stem="imagenet", weights="none")
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(BATCH, 3, 32, 32)).sum().backward()
    flops_per_image = counter.get_total_flops() / BATCH
    a = torch.randn(2048, 2048)
    a @ a
    started = time.perf_counter()
    for _ in range(10):
        a @ a
    matmul_flops = 10 * 2 * 2048**3 / (time.perf_counter() - started)
    return flops_per_image, matmul_flops


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=40_000, help="training images per epoch")
    parser.add_argument("--steps", type=int, default=30, help="timed steps of the bare loop")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of train.py and of the plain loop")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile on the bare step")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        source = prepare_data(folder, args.images)
        rows = []
        for batch_size, channels_last in ((BATCH, False), (BATCH, True), (256, True)):
            speed, _ = bare_step(batch_size, channels_last, args.steps)
            layout = "channels_last" if channels_last else "NCHW"
            rows.append((f"bare step, batch {batch_size}, {layout}", speed, ""))
        bare = rows[1][1]
        if args.compile:
            speed, warmup = bare_step(BATCH, True, args.steps, compile=True)
            rows.append(("bare step, batch 128, channels_last, torch.compile", speed, f"compile {warmup:.0f}s"))
        train_speed, n_train, seconds, train_acc = train_py_run(folder, args.images, args.epochs, folder / "run")
        note = f"{seconds:.1f}s/epoch, {train_speed / bare:.2f}x bare; val acc {train_acc:.2%}"
        rows.append(("train.py (--recipe seed)", train_speed, note))
        plain, plain_acc = plain_loop(folder, args.images, args.epochs)
        note = f"train.py is {train_speed / plain:.2f}x faster; val acc {plain_acc:.2%}"
        rows.append(("plain loop (ImageFolder, 2 workers)", plain, note))
        flops, matmul = arithmetic_ceiling()
        eval_seconds = evaluation_seconds()
    print(f"\ndata: {source}, {n_train} training images, {args.epochs} epochs of --recipe seed from scratch,")
    print(
        f"validation accuracy on the same 20% split; {torch.get_num_threads()} CPU threads, torch {torch.__version__}"
    )
    print(f"{'what':<52} {'img/s':>7}  note")
    for name, speed, note in rows:
        print(f"{name:<52} {speed:7.0f}  {note}")
    ceiling = matmul / flops
    print(f"\ntraining FLOPs per image {flops / 1e6:.0f} M; float32 matmul {matmul / 1e9:.0f} GFLOP/s;")
    print(f"arithmetic ceiling {ceiling:.0f} img/s; the bare step reaches {bare / ceiling:.0%} of it")
    print(f"evaluation, 10,000 images, batch 1024, inference mode: {eval_seconds:.1f}s")


if __name__ == "__main__":
    main()
