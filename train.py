"""Fine-tune ResNet18 on CIFAR-10 (or any image folder) with Hugging Face accelerate.

    accelerate launch train.py                        # the default recipe, ImageNet-pretrained
    accelerate launch train.py --recipe seed          # the seed write-up's recipe, exactly
    accelerate launch train.py --data-dir DIR --weights none --stem imagenet --epochs 2
    accelerate launch --multi_gpu --num_processes 2 train.py --mixed_precision bf16

The same script runs on CPU, one GPU or several: accelerate picks the device and the processes.
Each epoch writes last.safetensors, best.safetensors (lowest validation loss), history.json and
a resumable state/ to --output-dir.
"""

import argparse
import copy
import json
import math
import os
import shutil
import signal
import sys
import time
from datetime import datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, broadcast_object_list, set_seed
from safetensors import safe_open
from tqdm.auto import tqdm

import data
from model import ARCH, build_model, decode_metadata, save_checkpoint

# The default recipe. Every value is a flag; the README explains each choice.
DEFAULT_RECIPE = dict(
    epochs=30,
    batch_size=128,  # per process
    lr=0.05,  # peak, after warmup: fine-tuning, so below the from-scratch 0.1
    momentum=0.9,
    nesterov=True,
    weight_decay=5e-4,  # not applied to norms and biases
    schedule="cosine",
    warmup_epochs=1,
    label_smoothing=0.1,
    zero_init_residual=True,  # from scratch: helps at high lr, slows the seed's lr 0.001 down
    stem="cifar",
    crop_padding=2,  # measured: +2.2 points over 4 in 8 epochs from scratch (README, Accuracy)
    mean=data.CIFAR10_MEAN,
    std=data.CIFAR10_STD,
)
SCRATCH_LR = 0.2  # --weights none: no features to protect; measured +1.3 points over 0.1 (README, Accuracy)
# torchvision's stem divides the input by 32, so a 32x32 image ends as a 1x1 map; upsampled to 48x48
# it is 12x12 after the stem and 2x2 at the end. Measured from scratch at 8 epochs: 81.26% against
# 78.88% at 32x32, for 2.6x the time per epoch (README, Accuracy).
IMAGENET_STEM_INPUT_SIZE = 48
# The seed write-up: 81.92% validation accuracy after 50 epochs.
SEED_RECIPE = dict(
    epochs=50,
    batch_size=128,
    lr=1e-3,
    momentum=0.9,
    nesterov=False,
    weight_decay=0.0,
    schedule="constant",
    warmup_epochs=0,
    label_smoothing=0.0,
    zero_init_residual=False,
    stem="imagenet",
    crop_padding=4,
    input_size=data.IMAGE_SIZE,
    mean=(0.5, 0.5, 0.5),
    std=(0.5, 0.5, 0.5),
)
LOG_EVERY = 20  # steps between progress-bar updates (each one waits for the device)
RUN_FILES = ("history.json", "best.safetensors", "last.safetensors", "state", "state-tmp", "state-old")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data-dir", default="./data", help="CIFAR-10 location, or a folder with train/<class>/ images"
    )
    parser.add_argument("--output-dir", help="default: runs/<timestamp>")
    parser.add_argument("--recipe", choices=["default", "seed"], default="default")
    parser.add_argument("--weights", default="imagenet", help="imagenet, none, or a local ResNet18 state dict")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--max-train-samples", type=int, help="train on a stratified subset of about N images")
    parser.add_argument("--patience", type=int, help="stop after N epochs without a new lowest validation loss")
    parser.add_argument(
        "--targeted-augment",
        default="none",
        help="rotation, colour jitter and erasing for: none, all, animals, vehicles or class names",
    )
    parser.add_argument(
        "--class-weights",
        default="none",
        help="none; auto (inverse class frequency); a previous run's history.json or checkpoint "
        "(weights follow its per-class validation error); or w0,w1,...",
    )
    parser.add_argument("--two-stage", action="store_true", help="animals-vs-vehicles head, then a head per group")
    parser.add_argument("--resume", action="store_true", help="continue the run in --output-dir")
    parser.add_argument("--overwrite", action="store_true", help="replace the run in --output-dir")
    # Recipe settings: None means "take it from --recipe".
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int, help="per process")
    parser.add_argument("--lr", type=float, help="peak learning rate")
    parser.add_argument("--momentum", type=float)
    parser.add_argument("--nesterov", action=argparse.BooleanOptionalAction)
    parser.add_argument("--weight-decay", type=float)
    parser.add_argument("--schedule", choices=["cosine", "linear", "constant"])
    parser.add_argument("--warmup-epochs", type=float)
    parser.add_argument("--label-smoothing", type=float)
    parser.add_argument("--stem", choices=["cifar", "imagenet"])
    parser.add_argument("--zero-init-residual", action=argparse.BooleanOptionalAction)
    parser.add_argument("--crop-padding", type=int)
    parser.add_argument(
        "--input-size",
        type=int,
        help=f"side of the image the network sees, resized per batch; default {data.IMAGE_SIZE}, "
        f"{IMAGENET_STEM_INPUT_SIZE} with --stem imagenet",
    )
    parser.add_argument(
        "--ema", type=float, default=0.0, help="decay of an EMA of the weights, validated and saved instead; 0: off"
    )
    args = parser.parse_args(argv)
    if not 0 < args.val_fraction < 1:
        parser.error("--val-fraction must be between 0 and 1")
    if args.input_size is not None and args.input_size < 1:
        parser.error("--input-size must be a positive number of pixels")
    if args.resume:
        return args  # the run's saved settings apply; see resumed_settings
    recipe = SEED_RECIPE if args.recipe == "seed" else DEFAULT_RECIPE
    if args.recipe == "default" and args.weights == "none" and args.lr is None:
        args.lr = SCRATCH_LR
    for key, value in recipe.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.input_size is None:
        args.input_size = IMAGENET_STEM_INPUT_SIZE if args.stem == "imagenet" else data.IMAGE_SIZE
    return args


def resumed_settings(args, progress):
    """A resumed run keeps its own settings; only a new --epochs (to extend it) is taken. Settings
    that train.py gained after the run started take their defaults for the run's recipe."""
    saved = progress["config"]
    defaults = vars(parse_args(["--recipe", saved["recipe"], "--weights", saved["weights"]]))
    config = defaults | saved | {"resume": True, "output_dir": args.output_dir}
    if args.epochs is not None:
        config["epochs"] = args.epochs
    return argparse.Namespace(**config | {"mean": tuple(config["mean"]), "std": tuple(config["std"])})


def use_all_cores(accelerator):
    """`accelerate launch` on a CPU-only machine sets OMP_NUM_THREADS=1, leaving cores idle. Divide
    the cores among the local processes instead, unless the user chose a number for the launcher
    (OMP_NUM_THREADS in its environment, or --num_cpu_threads_per_process)."""
    if accelerator.device.type != "cpu":
        return
    try:
        launcher = Path(f"/proc/{os.getppid()}")
        command = launcher.joinpath("cmdline").read_bytes().split(b"\0")
        environment = launcher.joinpath("environ").read_bytes().split(b"\0")
    except OSError:
        return  # not Linux: leave it to the user
    launched = any(b"accelerate" in part for part in command) and b"launch" in command
    user_chose = any(e.startswith(b"OMP_NUM_THREADS=") for e in environment) or any(
        part.startswith(b"--num_cpu_threads_per_process") for part in command
    )
    if launched and not user_chose:
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local_processes))


def lr_factor(step, total_steps, warmup_steps, schedule):
    """Linear warmup, then constant, cosine or linear decay to zero (linear after a linear warmup
    is the one-cycle triangle)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1 + math.cos(math.pi * progress))


def parameter_groups(model, weight_decay):
    """Weight decay on conv and linear weights only: decaying norms and biases only hurts."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def class_weights(spec, train_labels, num_classes):
    """Cross-entropy weight per class, scaled to mean 1 (see --class-weights), or None."""
    if spec == "none":
        return None
    if spec == "auto":
        weights = 1 / torch.bincount(train_labels, minlength=num_classes).clamp(min=1).double()
    elif Path(spec).is_file():
        weights = 1 - torch.tensor(per_class_accuracy_of_run(Path(spec)), dtype=torch.double)
    else:
        try:
            weights = torch.tensor([float(w) for w in spec.split(",")], dtype=torch.double)
        except ValueError:
            sys.exit(f"error: --class-weights {spec!r} is not none, auto, a file or a list of numbers")
    if len(weights) != num_classes or not (weights >= 0).all() or weights.sum() <= 0:
        sys.exit(f"error: --class-weights needs {num_classes} non-negative weights, got {weights.tolist()}")
    return (weights * num_classes / weights.sum()).float()


def per_class_accuracy_of_run(path):
    """Per-class validation accuracy at a previous run's lowest validation loss."""
    try:
        if path.suffix == ".safetensors":
            with safe_open(path, framework="pt") as file:
                return decode_metadata(file.metadata())["val_per_class"]
        return min(json.loads(path.read_text()), key=lambda r: r["val_loss"])["val_per_class"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        sys.exit(f"error: no per-class validation accuracy in {path} ({error}); pass a run's history.json")


def choose_output_dir(args):
    """Pick the run's folder; refuse to touch a finished run unless told to resume or overwrite."""
    name = [args.output_dir or f"runs/{datetime.now():%Y-%m-%d_%H-%M-%S}"]
    broadcast_object_list(name)  # every process agrees on the timestamp
    out = Path(name[0])
    has_run = any((out / f).exists() for f in RUN_FILES)
    if args.resume and not latest_state(out):
        sys.exit(f"error: nothing to resume in {out}; start a new run without --resume")
    if has_run and not (args.resume or args.overwrite):
        sys.exit(
            f"error: {out} already holds a run; pass --resume to continue it, --overwrite to replace it, "
            f"or another --output-dir"
        )
    return out


def start_output_dir(out, args, accelerator):
    """Create the folder (or clear it for --overwrite) once the inputs have proved good."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if args.overwrite and not args.resume:
            for path in (out / name for name in RUN_FILES):
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()


def latest_state(out):
    """The newest complete state folder; state-old survives a crash between the two renames."""
    return next((out / name for name in ("state", "state-old") if (out / name / "progress.json").is_file()), None)


def save_state(accelerator, out, progress):
    """accelerate's save_state, made atomic: write state-tmp, then swap it in by renaming."""
    tmp, state, old = out / "state-tmp", out / "state", out / "state-old"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    if accelerator.is_main_process:
        write_json(tmp / "progress.json", progress)
        if state.exists():
            state.rename(old)
        tmp.rename(state)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def write_json(path, obj):
    temporary = Path(f"{path}.tmp")
    temporary.write_text(json.dumps(obj, indent=1))
    os.replace(temporary, path)


def sync_batchnorm_statistics(model, accelerator):
    """Each process updates its own BatchNorm running statistics; use the main process's, the
    ones that are saved, everywhere, so validation measures the checkpoint."""
    if accelerator.num_processes > 1:
        for buffer in accelerator.unwrap_model(model).buffers():
            torch.distributed.broadcast(buffer, src=0)


@torch.inference_mode()
def validate(model, loader, accelerator, args, num_classes):
    """Loss, accuracy and per-class accuracy over the whole split, every sample counted once."""
    model.eval()
    sync_batchnorm_statistics(model, accelerator)
    total_loss = torch.zeros((), device=accelerator.device)
    hits_per_class = torch.zeros(num_classes, device=accelerator.device)
    samples_per_class = torch.zeros(num_classes, device=accelerator.device)
    for images, labels in loader:
        with accelerator.autocast():
            logits = model(data.normalize(images, args.mean, args.std, args.input_size))
        losses = F.cross_entropy(logits.float(), labels, reduction="none")
        losses, hits, labels = accelerator.gather_for_metrics((losses, logits.argmax(1) == labels, labels))
        total_loss += losses.sum()
        hits_per_class += torch.bincount(labels, weights=hits.float(), minlength=num_classes)
        samples_per_class += torch.bincount(labels, minlength=num_classes)
    count = samples_per_class.sum().item()
    return dict(
        val_loss=total_loss.item() / count,
        val_acc=hits_per_class.sum().item() / count,
        val_samples=int(count),
        val_per_class=(hits_per_class / samples_per_class.clamp(min=1)).tolist(),
    )


def two_stage_groups(classes):
    groups = data.group_of_classes(classes)
    if groups is None:
        sys.exit(f"error: --two-stage needs data.GROUPS to name each of {classes} once; edit GROUPS in data.py")
    return list(groups.values())


@torch.no_grad()
def update_ema(ema, model, step, decay):
    """ema <- decay * ema + (1 - decay) * model, with the decay ramped up over the first steps (as
    timm does) so the random initial weights fade out fast. BatchNorm statistics are averaged too."""
    decay = min(decay, (1 + step) / (10 + step))
    for average, current in zip(ema.state_dict().values(), model.state_dict().values()):
        if average.dtype.is_floating_point:
            average.lerp_(current, 1 - decay)
        else:
            average.copy_(current)


def train_epoch(epoch, model, loader, optimizer, scheduler, criterion, accelerator, args, stop, targeted, ema):
    """One pass over the training split. Returns (loss, accuracy) or None when stopped early."""
    model.train()
    # Augmentation randomness depends only on (seed, epoch, process), so a resumed epoch replays exactly.
    generator = torch.Generator(accelerator.device).manual_seed(
        args.seed * 100_000 + epoch * 100 + accelerator.process_index
    )
    total_loss = torch.zeros((), device=accelerator.device)
    correct = torch.zeros((), dtype=torch.long, device=accelerator.device)
    seen = 0
    bar = tqdm(loader, desc=f"epoch {epoch}/{args.epochs}", leave=False, disable=not accelerator.is_local_main_process)
    for step, (images, labels) in enumerate(bar, 1):
        augmented = data.augment(images, labels, generator, args.crop_padding, targeted)
        inputs = data.normalize(augmented, args.mean, args.std, args.input_size)
        with accelerator.autocast():
            logits = model(inputs)
            loss = criterion(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        if ema is not None:
            update_ema(ema, accelerator.unwrap_model(model), (epoch - 1) * len(loader) + step, args.ema)
        total_loss += F.cross_entropy(logits.detach().float(), labels, reduction="sum")
        correct += (logits.argmax(1) == labels).sum()
        seen += len(labels)
        if step % LOG_EVERY == 0 or step == len(loader):
            if not math.isfinite(loss.item()):
                sys.exit(
                    f"error: the loss is {loss.item()} at epoch {epoch}, step {step}; lower --lr. "
                    f"The last checkpoint is untouched."
                )
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{scheduler.get_last_lr()[0]:.4g}")
        if stop.requested and accelerator.check_trigger():
            return None
    total_loss, correct = accelerator.reduce(total_loss, "sum"), accelerator.reduce(correct, "sum")
    seen *= accelerator.num_processes  # every process runs the same number of equal batches
    return total_loss.item() / seen, correct.item() / seen


class StopRequest:
    """Ctrl-C or SIGTERM asks the loop to stop at the next step; the processes agree through
    accelerate's trigger so none is left waiting in a collective."""

    def __init__(self, accelerator):
        self.requested = False
        self.accelerator = accelerator
        signal.signal(signal.SIGINT, self)
        signal.signal(signal.SIGTERM, self)

    def __call__(self, signum, frame):
        self.requested = True
        self.accelerator.set_trigger()


def checkpoint_metadata(args, classes, groups, accelerator, record):
    return {
        "arch": ARCH,
        "groups": groups,
        "stem": args.stem,
        "num_classes": len(classes),
        "classes": classes,
        "mean": list(args.mean),
        "std": list(args.std),
        "image_size": data.IMAGE_SIZE,
        "input_size": args.input_size,
        "seed": args.seed,
        "val_fraction": args.val_fraction,
        "epoch": record["epoch"],
        "val_loss": record["val_loss"],
        "val_acc": record["val_acc"],
        "val_per_class": record["val_per_class"],
        "num_processes": accelerator.num_processes,
        "config": vars(args),
    }


def main(argv=None):
    args = parse_args(argv)
    accelerator = Accelerator(
        cpu=not torch.accelerator.is_available(),  # else two CPU processes train separately (DistributedType.NO)
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
    )
    use_all_cores(accelerator)
    out = choose_output_dir(args)
    state_dir = latest_state(out) if args.resume else None
    if state_dir:
        progress = json.loads((state_dir / "progress.json").read_text())
        args = resumed_settings(args, progress)
    set_seed(args.seed)
    accelerator.print(
        f"{accelerator.num_processes} process(es) ({accelerator.distributed_type.value}) on {accelerator.device}, "
        f"{torch.get_num_threads()} CPU thread(s) each, mixed precision {accelerator.mixed_precision}"
    )

    with accelerator.main_process_first():  # one process downloads, the others then read
        images, labels, classes = data.load_images(args.data_dir, "train")
    train_idx, val_idx = data.train_val_indices(labels, args.val_fraction, args.seed, args.max_train_samples)
    images, labels = images.to(accelerator.device), labels.to(accelerator.device)
    train_loader = data.make_loader(images[train_idx], labels[train_idx], args.batch_size, shuffle=True)
    val_loader = data.make_loader(images[val_idx], labels[val_idx], 1024, shuffle=False)
    accelerator.print(
        f"data: {len(train_idx)} train / {len(val_idx)} val images, {len(classes)} classes, from {args.data_dir}"
    )

    targeted = torch.tensor(data.class_indices(args.targeted_augment, classes), device=accelerator.device)
    groups = two_stage_groups(classes) if args.two_stage else None
    model = build_model(len(classes), args.stem, args.weights, groups, args.zero_init_residual)
    model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(
        parameter_groups(model, args.weight_decay), lr=args.lr, momentum=args.momentum, nesterov=args.nesterov
    )
    # Counted in batches of the whole dataset; accelerate steps the scheduler once per process.
    total_steps = args.epochs * len(train_loader)
    warmup_steps = round(args.warmup_epochs * len(train_loader))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup_steps, args.schedule)
    )
    weights = class_weights(args.class_weights, labels[train_idx].cpu(), len(classes))
    criterion = torch.nn.CrossEntropyLoss(weight=weights, label_smoothing=args.label_smoothing).to(accelerator.device)
    model, optimizer, train_loader, val_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, val_loader, scheduler
    )
    # The EMA copy is not wrapped for data parallel: every process updates it from the same weights.
    ema = copy.deepcopy(accelerator.unwrap_model(model)).requires_grad_(False) if args.ema else None
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    evaluated = ema if ema is not None else model
    start_output_dir(out, args, accelerator)
    accelerator.print(
        f"recipe: {args.recipe}, {args.epochs} epochs, batch {args.batch_size} per process, lr {args.lr} "
        f"({args.schedule}, {args.warmup_epochs} warmup), weights {args.weights}, stem {args.stem}, "
        f"input {args.input_size}x{args.input_size}"
    )

    history, best_val_loss = [], math.inf
    if state_dir:
        accelerator.load_state(state_dir)
        history, best_val_loss = progress["history"], progress["best_val_loss"]
        accelerator.print(f"resumed {out} after epoch {len(history)}")
    else:  # a state before the first step, so that even a run killed in epoch 1 resumes
        save_state(accelerator, out, dict(config=vars(args), history=history, best_val_loss=best_val_loss))
    stop = StopRequest(accelerator)
    for epoch in range(len(history) + 1, args.epochs + 1):
        train_loader.set_epoch(epoch)
        started = time.perf_counter()
        result = train_epoch(
            epoch, model, train_loader, optimizer, scheduler, criterion, accelerator, args, stop, targeted, ema
        )
        seconds = time.perf_counter() - started
        if result is None:
            accelerator.print(
                f"\nstopped during epoch {epoch}; {out} holds the state from before it. Resume with:\n"
                f"  accelerate launch train.py --output-dir {out} --resume"
            )
            sys.exit(130)
        record = dict(
            epoch=epoch,
            train_loss=result[0],
            train_acc=result[1],
            **validate(evaluated, val_loader, accelerator, args, len(classes)),
            lr=scheduler.get_last_lr()[0],
            seconds=round(seconds, 2),
        )
        history.append(record)
        improved = record["val_loss"] < best_val_loss
        best_val_loss = min(best_val_loss, record["val_loss"])
        if accelerator.is_main_process:
            metadata = checkpoint_metadata(args, classes, groups, accelerator, record)
            save_checkpoint(accelerator.unwrap_model(evaluated), out / "last.safetensors", metadata)
            if improved:
                save_checkpoint(accelerator.unwrap_model(evaluated), out / "best.safetensors", metadata)
            write_json(out / "history.json", history)
        save_state(accelerator, out, dict(config=vars(args), history=history, best_val_loss=best_val_loss))
        accelerator.print(
            f"epoch {epoch:3d}/{args.epochs}  train loss {result[0]:.4f} acc {result[1]:6.2%}  "
            f"val loss {record['val_loss']:.4f} acc {record['val_acc']:6.2%}  {seconds:6.1f}s "
            f"({len(train_idx) / seconds:.0f} img/s){'  *best' if improved else ''}"
        )
        best_epoch = min(history, key=lambda r: r["val_loss"])["epoch"]
        if args.patience and epoch - best_epoch >= args.patience:
            accelerator.print(f"early stop: no lower validation loss for {args.patience} epochs")
            break
    best = min(history, key=lambda r: r["val_loss"])
    accelerator.print(
        f"best: epoch {best['epoch']}, val loss {best['val_loss']:.4f}, val acc {best['val_acc']:.2%}\n"
        f"wrote {out}/best.safetensors, last.safetensors, history.json\n"
        f"evaluate: python evaluate.py {out}/best.safetensors --data-dir {args.data_dir}"
    )


if __name__ == "__main__":
    main()
