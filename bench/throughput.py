"""Training and evaluation throughput on this machine, side by side, in one run.

    python bench/throughput.py                        # CPU: 40,000 training images, as a real run
    python bench/throughput.py --before a1691e8,2f3d6ec   # also train.py as it was at these commits
    python bench/throughput.py --images 2000 --only bare,train   # quicker, some rows
    python bench/throughput.py --only sizes                       # bf16 against float32 at each recipe's size
    python bench/throughput.py --only sizes,compile               # ... and each compiled
    python bench/throughput.py --images 10000 --rounds 3 --only bare,train,plain  # the speed goals
    python bench/throughput.py --images 10000 --rounds 3 --only disk,cache,pss   # the decode-once cache
    python bench/throughput.py --images 10000 --rounds 3 --only train,controls,before --before 41d24cc
    bench/gpu.sh                                      # GPU: the --device cuda table, on CIFAR-10

CPU rows (--recipe seed, torchvision's stem at 32x32, from scratch, batch 128, float32 unless said):
- bare step: forward + backward + SGD on one batch already in memory (the ceiling for any loop),
  also in bf16 autocast and compiled (torch.compile, its compilation timed);
- sizes: the bare step at the inputs of the three recipes (32, 48 and 64 pixels a side), in float32
  and in bf16 autocast;
- train.py: whole epochs of `train.py --recipe seed` (data, augmentation, step, logging;
  validation excluded), as history.json records them: the first epoch, and the last one as the
  steady speed; then with --compile (the first epoch includes a cold compilation: inductor's cache
  starts empty, as on a new machine), with bf16 autocast, and as it was at each --before revision;
- plain loop: what users usually write: torchvision's ImageFolder with per-sample transforms, a
  DataLoader with 2 workers, NCHW, eager, the same recipe and split;
- evaluation: evaluate.py's forward passes over 10,000 images;
- photos: the shared ants/bees photos (245, about 500x375) decoded at 256x256, and `train.py` on
  them at its photo defaults (224x224 random-resized crops, torchvision's stem), from scratch;
- controls: train.py with --auto-augment ta_wide and with --mixup 0.2, to compare with the train.py row;
- disk: train.py --data-on device against --data-on disk (the page cache warm), on a folder of links
  to the first images of each class (a --max-train-samples cut would write no cache);
- cache: load times of the training folder and of --photos made 500x375 JPEGs: decoded, decoded
  into a new cache, read from it;
- pss: the summed proportional set size of train.py's processes, 1 and 2, --data-on disk and device.
Every train.py row and the plain loop report the validation accuracy they reach. A shared machine's
speed drifts within minutes: --rounds N times the training rows N times in turn, and each ratio is
taken within a round, so that it compares runs a minute apart.

--device cuda (or --table gpu on a CPU, to rehearse it on tiny data): bare step and train.py for
float32 and bf16 autocast, eager and compiled, at batch 512 and 128, --data-on device and disk
(channels_last, the default recipe's CIFAR stem), and the wall time of a 30-epoch default run and
its validation accuracy; most important first, within --budget seconds.

Data: --data-dir, else the shared CIFAR-10 JPEGs (../shared/data) when present, else random 32x32
images of the same shape written to a temporary folder.
"""

import argparse
import contextlib
import functools
import itertools
import json
import os
import statistics
import subprocess
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
from model import build_model  # noqa: E402

SHARED = ROOT.parent / "shared" / "data" / "cifar10-jpeg-train.tar.gz"
PHOTOS = ROOT.parent / "shared" / "data" / "photos-ants-bees-train.tar.gz"
BATCH = 128
CPU_ROWS = "bare sizes compile train disk controls bf16 before plain eval photos cache pss".split()
CONTROLS = {"--auto-augment ta_wide": ("--auto-augment", "ta_wide"), "--mixup 0.2": ("--mixup", "0.2")}
LONG_RUN_EPOCHS = 30
SIDES = (32, 48, 64)  # the sizes row: the seed's input, the default's (--stem imagenet), 64 past the cpu recipe's 56


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


def bare_step(batch_size, steps, channels_last=True, compile=False, bf16=False, stem="imagenet", device="cpu", side=32):
    """Images/s of forward + backward + SGD on a fixed in-memory batch, and the seconds of the
    first two steps (compilation included)."""
    model = build_model(10, stem=stem, weights="none").to(device)
    inputs = torch.randn(batch_size, 3, side, side, device=device)
    labels = torch.randint(0, 10, (batch_size,), device=device)
    if channels_last:
        model, inputs = (
            model.to(memory_format=torch.channels_last),
            inputs.contiguous(memory_format=torch.channels_last),
        )
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    forward = torch.compile(model) if compile else model

    def step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(forward(inputs), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def finished():  # a GPU runs behind the host: wait for it before reading the clock
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    started = time.perf_counter()
    step()
    step()  # warm-up (and compilation)
    warmup = finished() - started
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch_size / (finished() - started), warmup


def train_py_run(folder, images, epochs, out, *flags, env=None, script=ROOT / "train.py"):
    """train.py in its own process, as a user runs it (its compilation caches and threads its own).
    Returns (first epoch seconds, last epoch images/s, last validation accuracy, wall seconds)."""
    command = [sys.executable, str(script), "--data-dir", str(folder), "--epochs", str(epochs),
               "--max-train-samples", str(images), "--output-dir", str(out), *flags]  # fmt: skip
    started = time.perf_counter()
    subprocess.run(command, cwd=script.parent, env=os.environ | (env or {}), check=True, stdout=sys.stderr)
    wall = time.perf_counter() - started
    history = json.loads((out / "history.json").read_text())
    batch_size = json.loads((out / "state" / "progress.json").read_text())["config"]["batch_size"]
    trained = train_images(folder, images) // batch_size * batch_size  # train.py drops the last partial batch
    return history[0]["seconds"], trained / history[-1]["seconds"], history[-1]["val_acc"], wall


@functools.cache
def train_images(folder, images):
    _, labels, classes = data.list_images(folder, "train")
    return len(data.train_val_indices(labels, classes, 0.2, 0, images)[0])


def subset_folder(folder, images, scratch):
    """A folder of links to the first images / 0.8 of each class's images, so that train.py's split of it
    holds about `images` training images with no --max-train-samples cut (a cut subset writes no cache)."""
    _, labels, classes = data.list_images(folder, "train")
    per_class = -(-images * 5 // 4 // len(classes))
    subset = Path(tempfile.mkdtemp(dir=scratch, prefix="subset-"))
    for name in classes:
        (subset / "train" / name).mkdir(parents=True)
        for path in sorted((folder / "train" / name).iterdir())[:per_class]:
            (subset / "train" / name / path.name).symlink_to(path.resolve())
    return subset


def load_seconds(folder, side, cache):
    started = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # its log lines are not the table's
        data.load_split(folder, side, 0.2, 0, cache_dir=cache)
    return time.perf_counter() - started


def cache_rows(folder, scratch, count):
    """Load times of an image folder (train/ and the validation split): decoded, decoded into a new
    cache, and read from that cache; for folder and for a photo folder made here."""
    photos = Path(tempfile.mkdtemp(dir=scratch, prefix="photos-"))
    rng = np.random.default_rng(0)
    for i in range(count):  # smooth colour fields with a little noise: JPEGs of photo-like size
        low = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
        image = Image.fromarray(low).resize((500, 375), Image.BICUBIC)
        noisy = np.clip(np.asarray(image) + rng.normal(0, 8, (375, 500, 3)), 0, 255).astype(np.uint8)
        (photos / "train" / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(noisy).save(photos / "train" / f"class{i % 2}" / f"{i:05d}.jpg", quality=85)
    lines = []
    for name, where, side in (("the training folder", folder, data.IMAGE_SIZE), ("photos 500x375", photos, 256)):
        count = len(data.list_images(where, "train")[1])
        cache = Path(tempfile.mkdtemp(dir=scratch, prefix="cache-"))
        decoded, built, read = (load_seconds(where, side, c) for c in (None, cache, cache))
        lines.append(f"load {count} images ({name}) at {side}x{side}: decoded {decoded:.1f}s; into a new cache "
                     f"{built:.1f}s; from the cache {read:.2f}s ({decoded / read:.0f}x faster)")  # fmt: skip
    return lines


def pss_kib(marker):
    """The summed proportional set size of the processes whose command line holds marker (Linux)."""
    total = 0
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker in (proc / "cmdline").read_bytes():
                rollup = (proc / "smaps_rollup").read_text()
                total += int(next(line for line in rollup.splitlines() if line.startswith("Pss:")).split()[1])
        except (OSError, StopIteration):
            pass  # gone meanwhile
    return total


def peak_pss(folder, scratch, processes, data_on):
    """The highest summed PSS (GiB) of a 1-epoch train.py --recipe seed run's processes, sampled every 0.2 s."""
    out = Path(tempfile.mkdtemp(dir=scratch)) / "run"
    launch = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes), "-q"]
    command = [sys.executable, *(launch if processes > 1 else []), "train.py", "--data-dir", str(folder),
               "--epochs", "1", "--recipe", "seed", "--weights", "none", "--data-on", data_on,
               "--output-dir", str(out)]  # fmt: skip
    run = subprocess.Popen(command, cwd=ROOT, stdout=sys.stderr)
    peak = 0
    while run.poll() is None:
        peak = max(peak, pss_kib(str(out).encode()))
        time.sleep(0.2)
    if run.returncode:
        raise subprocess.CalledProcessError(run.returncode, command)
    return peak / 2**20


def pss_rows(folder, scratch):
    rows = [(1, "disk"), (2, "disk"), (1, "device"), (2, "device")]
    peaks = {row: peak_pss(folder, scratch, *row) for row in rows}
    lines = ["memory of the training processes (summed PSS, peak, 1 epoch):"]
    lines += [f"  --data-on {on:<6} {n} process(es): {peaks[(n, on)]:.2f} GiB" for n, on in rows]
    return lines


def cold_inductor(scratch):
    """An empty inductor cache, so that a compiled run's first epoch includes the whole compilation."""
    cache = Path(tempfile.mkdtemp(dir=scratch, prefix="inductor-"))
    return {"TORCHINDUCTOR_CACHE_DIR": str(cache)}


def checkout(revision, scratch):
    """The scripts as they were at revision, in a folder of their own."""
    folder = Path(tempfile.mkdtemp(dir=scratch, prefix="before-"))
    files = subprocess.run(
        ["git", "ls-tree", "--name-only", revision], cwd=ROOT, check=True, capture_output=True, text=True
    )
    scripts = [name for name in ("train.py", "data.py", "model.py", "evaluate.py") if name in files.stdout.split()]
    archive = subprocess.run(["git", "archive", revision, *scripts], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder / "train.py"


def plain_loop(folder, images, epochs):
    """The loop most tutorials show, on the same split and recipe as train.py --recipe seed.
    Returns (training images/s, validation accuracy)."""
    normalize = [T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)]
    augment = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), *normalize])
    dataset = torchvision.datasets.ImageFolder(folder / "train", transform=augment)
    train_idx, val_idx = data.train_val_indices(torch.tensor(dataset.targets), dataset.classes, 0.2, 0, images)
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


def photo_rows(scratch, epochs):
    """(load seconds, images, train.py img/s, val acc) on the shared ants/bees photos."""
    folder = Path(tempfile.mkdtemp(dir=scratch, prefix="photos-"))
    with tarfile.open(PHOTOS) as archive:
        archive.extractall(folder, filter="data")
    side = round(data.PHOTO_INPUT_SIZE * data.STORED_SCALE)
    started = time.perf_counter()
    splits, _, _, _ = data.load_split(folder, side, 0.2, 0)
    load = time.perf_counter() - started
    count = sum(len(split) for split in splits.values())
    out = Path(tempfile.mkdtemp(dir=scratch)) / "run"
    command = [sys.executable, "train.py", "--data-dir", str(folder), "--epochs", str(epochs), "--weights", "none",
               "--batch-size", "32", "--output-dir", str(out)]  # fmt: skip
    subprocess.run(command, cwd=ROOT, check=True, stdout=sys.stderr)
    history = json.loads((out / "history.json").read_text())
    return load, count, len(splits["train"][1]) // 32 * 32 / history[-1]["seconds"], history[-1]["val_acc"]


BARE = "bare step, batch 128, channels_last"
PLAIN = "plain loop (ImageFolder, 2 workers)"


def cpu_round(args, folder, scratch, scripts, first):
    """One pass over the selected training rows: {row: (img/s, note)}. The bare step that the
    ratios compare with is timed at the start and at the end, and averaged, so that a drift of the
    machine's speed during the round weighs on both sides; its variants (other batch and layout,
    bf16, compiled) only in the first round."""
    results, seed = {}, ("--recipe", "seed", "--weights", "none")
    if "bare" in args.only:
        results[BARE] = (bare_step(BATCH, args.steps)[0], "")
    if "bare" in args.only and first:
        for batch_size, channels_last in ((BATCH, False), (256, True)):
            speed, _ = bare_step(batch_size, args.steps, channels_last)
            results[f"bare step, batch {batch_size}, {'channels_last' if channels_last else 'NCHW'}"] = (speed, "")
        results[f"{BARE}, bf16 autocast"] = (bare_step(BATCH, args.steps, bf16=True)[0], "")
    if "compile" in args.only and first:
        os.environ.update(cold_inductor(scratch))  # this process compiles next; train.py gets its own below
    if "sizes" in args.only and first:  # what bf16 autocast gains depends on the input's size too
        compilations = (False, True) if "compile" in args.only else (False,)  # as --recipe cpu --compile's steps
        for side in SIDES:
            for bf16, compiled in itertools.product((False, True), compilations):
                speed, warmup = bare_step(BATCH, args.steps, bf16=bf16, side=side, compile=compiled)
                name = f"bare step at {side}x{side}, {'bf16 autocast' if bf16 else 'float32'}"
                results[name + ", torch.compile" * compiled] = (speed, f"first 2 steps {warmup:.0f}s" * compiled)
    if "compile" in args.only and first:
        speed, warmup = bare_step(BATCH, args.steps, compile=True)
        results[f"{BARE}, torch.compile"] = (speed, f"first 2 steps {warmup:.0f}s")
    runs = [  # (row, name, flags, environment, revision)
        ("train", "train.py --recipe seed", (), None, None),
        ("disk", "train.py --recipe seed --data-on device", ("--data-on", "device"), None, None),
        ("disk", "train.py --recipe seed --data-on disk", ("--data-on", "disk"), None, None),
        *(("controls", f"train.py --recipe seed {name}", flags, None, None) for name, flags in CONTROLS.items()),
        ("compile", "train.py --recipe seed --compile", ("--compile",), cold_inductor(scratch), None),
        ("bf16", "train.py --recipe seed, bf16 autocast", (), {"ACCELERATE_MIXED_PRECISION": "bf16"}, None),
        *(("before", f"train.py --recipe seed at {revision}", (), None, revision) for revision in args.before),
    ]
    for part, name, flags, env, revision in runs:
        if part in args.only:
            out = Path(tempfile.mkdtemp(dir=scratch)) / "run"
            # from disk, the folder must be whole (a --max-train-samples cut writes no cache): its linked subset
            where, images = (args.subset, 10**9) if part == "disk" else (folder, args.images)
            first, speed, acc, _ = train_py_run(
                where, images, args.epochs, out, *seed, *flags, env=env, script=scripts[revision]
            )
            results[name] = (speed, f"epoch 1 {first:.1f}s; val acc {acc:.2%}")
    if "plain" in args.only and (folder / "train").is_dir():
        speed, acc = plain_loop(folder, args.images, args.epochs)
        results[PLAIN] = (speed, f"val acc {acc:.2%}")
    if "bare" in args.only:
        results[BARE] = ((results[BARE][0] + bare_step(BATCH, args.steps)[0]) / 2, "")
    return results


def ratio(rounds, row, to, label=""):
    """row's speed over to's, taken within each round (the machine's speed drifts between rounds):
    the median, then every round's in round order; or the one round that timed row."""
    ratios = [(n, r[row][0] / r[to][0]) for n, r in enumerate(rounds, 1) if row in r]
    median = statistics.median(x for _, x in ratios)
    if len(rounds) == 1:
        return f"{median:.2f}x{label}"
    if len(ratios) == 1:
        return f"{median:.2f}x{label} (round {ratios[0][0]})"
    return f"{median:.2f}x{label} (rounds: {', '.join(f'{x:.2f}' for _, x in ratios)})"


def cpu_table(args, folder, scratch):
    """The CPU rows, each timed --rounds times in turn; returns the lines to print."""
    scripts = {None: ROOT / "train.py"} | {revision: checkout(revision, scratch) for revision in args.before}
    rounds = []
    for n in range(args.rounds):
        rounds.append(cpu_round(args, folder, scratch, scripts, first=n == 0))
        speeds = ", ".join(f"{row} {speed:.0f}" for row, (speed, _) in rounds[-1].items())
        print(f"round {n + 1}: {speeds} img/s", file=sys.stderr)
    several = " (median)" if args.rounds > 1 else ""
    lines = [f"{'what':<52} {'img/s' + several:>14}  note"]
    for row in rounds[0]:
        speed = statistics.median(r[row][0] for r in rounds if row in r)
        note = next(r[row][1] for r in reversed(rounds) if row in r)
        if BARE in rounds[0] and row != BARE:
            note = "; ".join(filter(None, [note, ratio(rounds, row, BARE, " bare")]))
        lines.append(f"{row:<52} {speed:14.0f}  {note}")
    train = "train.py --recipe seed"
    if train in rounds[0] and BARE in rounds[0]:
        lines.append(f"\ntrain.py / bare step: {ratio(rounds, train, BARE)}; at least 0.95 expected")
    if train in rounds[0] and PLAIN in rounds[0]:
        lines.append(f"train.py / plain loop: {ratio(rounds, train, PLAIN)}; at least 1.3 expected")
    for name in CONTROLS:
        if f"{train} {name}" in rounds[0] and train in rounds[0]:
            lines.append(f"train.py {name} / train.py: {ratio(rounds, f'{train} {name}', train)}")
    disk, device = (f"{train} --data-on {on}" for on in ("disk", "device"))
    if disk in rounds[0]:
        lines.append(
            f"train.py --data-on disk / --data-on device: {ratio(rounds, disk, device)}; at least 0.9 expected"
        )
    if "cache" in args.only:
        lines += ["", *cache_rows(folder, scratch, args.photos)]
    if "pss" in args.only:
        lines += ["", *pss_rows(args.subset, scratch)]
    if "eval" in args.only:
        flops, matmul = arithmetic_ceiling()
        lines.append(f"\ntraining FLOPs per image {flops / 1e6:.0f} M; float32 matmul {matmul / 1e9:.0f} GFLOP/s;")
        bare = statistics.median(r[BARE][0] for r in rounds) if BARE in rounds[0] else None
        lines.append(
            f"arithmetic ceiling {matmul / flops:.0f} img/s"
            + (f"; bare step {bare / (matmul / flops):.0%}" if bare else "")
        )
        lines.append(f"evaluation, 10,000 images, batch 1024, inference mode: {evaluation_seconds():.1f}s")
    if "photos" in args.only and PHOTOS.is_file():
        load, count, speed, acc = photo_rows(scratch, args.epochs)
        cores = len(os.sched_getaffinity(0))
        lines += [
            f"\nphotos: {count} images decoded at 256x256 in {load:.1f}s ({cores} decoding threads);",
            f"train.py at 224x224, batch 32, from scratch: {speed:.1f} img/s, "
            f"val acc {acc:.2%} after {args.epochs} epochs",
        ]
    return lines


# The GPU table's rows, most important first, measured while the --budget allows:
# (batch, bf16, compile, --data-on); "long" is the 30-epoch default run.
GPU_ROWS = [
    (512, False, False, "device"),
    "long",
    (512, True, False, "device"),
    (512, False, False, "disk"),
    (512, True, True, "device"),
    (128, False, False, "device"),
    (128, True, False, "device"),
    (512, False, True, "device"),
    (128, False, True, "device"),
    (128, True, True, "device"),
]


def gpu_table(args, folder, scratch):
    """The GPU rows in GPU_ROWS order: bare step and train.py per batch size, precision, compilation
    and --data-on, and the 30-epoch default run; a row is left out when the time it is expected to
    take (the last row's, or for the long run 30 of the first row's epochs) would pass --budget."""
    device = "cuda" if args.device == "cuda" else "cpu"  # cpu: a rehearsal of the table, on tiny data
    started, last, epoch_seconds = time.perf_counter(), 0.0, None
    lines = [f"{'batch':>5} {'precision':<9} {'compile':<7} {'data on':<7} {'bare img/s':>10} {'train.py img/s':>14} "
             f"{'ratio':>5} {'epoch 1':>8} {'val acc':>7}"]  # fmt: skip
    skipped = []
    for row in GPU_ROWS:
        expected = LONG_RUN_EPOCHS * epoch_seconds if row == "long" and epoch_seconds else last
        if time.perf_counter() - started + expected > args.budget:
            skipped.append("30-epoch default run" if row == "long" else "batch {}, {}, compile {}, data on {}".format(
                row[0], "bf16" if row[1] else "float32", "yes" if row[2] else "no", row[3]))  # fmt: skip
            continue
        row_started = time.perf_counter()
        if row == "long":
            out = Path(tempfile.mkdtemp(dir=scratch)) / "run"
            _, _, acc, wall = train_py_run(folder, 10**9, LONG_RUN_EPOCHS, out, "--weights", args.weights)
            long_line = (f"\n{LONG_RUN_EPOCHS}-epoch default run (float32, eager, --weights {args.weights}): "
                         f"{wall / 60:.1f} min wall, {acc:.2%} validation accuracy")  # fmt: skip
        else:
            batch_size, bf16, compile, data_on = row
            bare, _ = bare_step(batch_size, args.steps, compile=compile, bf16=bf16, stem="cifar", device=device)
            flags = ["--weights", "none", "--batch-size", str(batch_size), "--data-on", data_on] + compile * [
                "--compile"
            ]
            env = ({"ACCELERATE_MIXED_PRECISION": "bf16"} if bf16 else {}) | cold_inductor(scratch)
            out = Path(tempfile.mkdtemp(dir=scratch)) / "run"
            images = 10**9 if data_on == "disk" else args.images  # from disk the folder is whole: no cut, a cache
            first, speed, acc, _ = train_py_run(folder, images, args.epochs, out, *flags, env=env)
            epoch_seconds = epoch_seconds or json.loads((out / "history.json").read_text())[-1]["seconds"]
            precision, compiled = "bf16" if bf16 else "float32", "yes" if compile else "no"
            lines.append(f"{batch_size:>5} {precision:<9} {compiled:<7} {data_on:<7} {bare:10.0f} {speed:14.0f} "
                         f"{speed / bare:5.2f} {first:7.1f}s {acc:7.2%}")  # fmt: skip
        last = time.perf_counter() - row_started
    if not any("30-epoch" in name for name in skipped):
        lines.append(long_line)
    spent = time.perf_counter() - started
    lines.append(
        f"\nbudget: {spent:.0f}s of {args.budget:.0f}s spent" + (f"; left out: {'; '.join(skipped)}" if skipped else "")
    )
    return lines


def positive(text):
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number, at least 1; got {text!r}")
    return int(text)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--table", choices=["cpu", "gpu"], help="the rows: cpu, or gpu (the default on cuda; on a cpu, a rehearsal)"
    )
    parser.add_argument(
        "--budget",
        type=positive,
        default=420,
        help="GPU table: seconds it may take; rows that would pass it are left out",
    )
    parser.add_argument("--data-dir", type=Path, help="an image folder with train/, or CIFAR-10's (made if not given)")
    parser.add_argument("--images", type=positive, default=40_000, help="training images per epoch")
    parser.add_argument("--steps", type=positive, help="timed steps of the bare loop (60 on a CPU, 300 on a GPU)")
    parser.add_argument("--epochs", type=positive, default=2, help="epochs of each train.py run and of the plain loop")
    parser.add_argument(
        "--rounds", type=positive, default=1, help="CPU: time the training rows this many times in turn; medians"
    )
    parser.add_argument("--only", default=",".join(CPU_ROWS), help=f"CPU rows, comma-separated: {','.join(CPU_ROWS)}")
    parser.add_argument(
        "--before", default="", help="git revisions, comma-separated: also time train.py as it was there"
    )
    parser.add_argument("--photos", type=positive, default=2000, help="cache rows: the photos (500x375 JPEGs) made")
    parser.add_argument("--weights", default="imagenet", help="--device cuda: the 30-epoch run's --weights")
    args = parser.parse_args()
    args.only, args.before = args.only.split(","), [rev for rev in args.before.split(",") if rev]
    if not set(args.only) <= set(CPU_ROWS):
        parser.error(f"--only takes some of {','.join(CPU_ROWS)}")
    args.steps = args.steps or (300 if args.device == "cuda" else 60)
    try:  # the data, before anything is timed
        if args.data_dir:
            data.list_images(args.data_dir, "train")
    except data.UserError as error:
        parser.error(str(error))
    for revision in args.before:
        if subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{revision}^{{commit}}"], cwd=ROOT).returncode:
            parser.error(f"--before {revision} is not a revision of this repository")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda needs a GPU that torch can use")
    with tempfile.TemporaryDirectory() as scratch:
        os.environ["XDG_CACHE_HOME"] = str(Path(scratch) / "cache")  # train.py's caches: gone with the scratch
        folder = args.data_dir or Path(scratch) / "data"
        source = str(args.data_dir) if args.data_dir else prepare_data(folder, args.images)
        if {"disk", "pss"} & set(args.only):
            args.subset = subset_folder(folder, args.images, Path(scratch))
        try:
            gpu = (args.table or ("gpu" if args.device == "cuda" else "cpu")) == "gpu"
            table = (gpu_table if gpu else cpu_table)(args, folder, Path(scratch))
        except subprocess.CalledProcessError as error:  # train.py has printed its own error line
            sys.exit(f"error: {Path(error.cmd[1]).name} stopped with exit code {error.returncode}; see above")
        n_train = train_images(folder, args.images)
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"{torch.get_num_threads()} CPU threads"
    epochs = f"{args.epochs} epoch{'s' if args.epochs > 1 else ''}"
    print(f"\ndata: {source}, {n_train} training images, {epochs} per train.py row, from scratch;")
    print(f"validation accuracy on the same 20% split; {device}, torch {torch.__version__}")
    print("\n".join(table))


if __name__ == "__main__":
    main()
