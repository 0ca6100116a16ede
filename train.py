"""Fine-tune ResNet18 on CIFAR-10 (or any image folder) with Hugging Face accelerate.

    accelerate launch train.py                        # the default recipe, ImageNet-pretrained
    accelerate launch train.py --recipe seed          # the seed write-up's recipe, exactly
    accelerate launch train.py --data-dir DIR --weights none --stem imagenet --epochs 2
    accelerate launch --multi_gpu --num_processes 2 --mixed_precision bf16 train.py
    accelerate launch train.py --compile --log-with tensorboard

The same script runs on CPU, one GPU or several: accelerate picks the device and the processes.
On a CPU the default (cifar stem) takes hours; --recipe cpu (torchvision's stem, 32x32 then 48x48) about 22 minutes
on 2 cores, from scratch to 84% (bench/accuracy.md).
Each epoch writes last.safetensors, best.safetensors (lowest validation loss), history.json and
a resumable state/ to --output-dir.
"""

import ctypes
import os
import signal
import sys
from pathlib import Path

# ruff: noqa: E402 (the imports below come after this)
# Ctrl-C during the slow imports below: exit quietly, as main() does later. os._exit, not sys.exit: an
# exception raised inside a half-loaded C extension (numpy's) can break the interpreter's shutdown.
if __name__ == "__main__":
    signal.signal(signal.SIGINT, lambda signum, frame: os._exit(130))
PARENT = os.getppid()  # before the slow imports: see launcher_of_this_process

import argparse
import contextlib
import copy
import errno
import functools
import itertools
import json
import math
import re
import shlex
import shutil
import time
from datetime import datetime
from fractions import Fraction
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.commands.config.config_args import default_config_file
from accelerate.tracking import get_available_trackers
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedDataParallelKwargs,
    GradientAccumulationPlugin,
    LoggerType,
    broadcast_object_list,
    set_seed,
)
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

import data
import model  # model.ARCH is read when a run starts
from data import UserError, bounded
from evaluate import PLOT_KINDS, calibration, calibration_caveat, drawn_here, fit_temperature, png_source, writing
from model import (
    best_record,
    build_model,
    check_folder_can_be_made,
    decode_metadata,
    freeze_backbone,
    is_head,
    not_a_folder,
    save_checkpoint,
    usual_permissions,
    write_atomically,
)

if __name__ == "__main__":  # imported: from here on main() handles Ctrl-C
    signal.signal(signal.SIGINT, signal.default_int_handler)

RUN_WEIGHT_FLOOR = 0.1  # --class-weights RUN: a class the run got all right weighs a tenth of the mean error
VAL_FRACTION = 0.2  # of train/, stratified, when the data has no val/ folder (the write-up's 80/20)
SCRATCH_LR = 0.2  # --weights none: no features to protect; measured +1.3 points over 0.1 (bench/accuracy.md)
# Photos: a folder of a few hundred would make one or two steps an epoch at batch 128. The recipe's lr is
# scaled with the batch (the linear scaling rule, Goyal et al. 2017) unless --lr is given.
PHOTO_BATCH_SIZE = 32
# torchvision's stem divides the input by 32, so a 32x32 image ends as a 1x1 map; upsampled to 48x48
# it is 12x12 after the stem and 2x2 at the end. Measured from scratch at 8 epochs: 81.26% against
# 78.88% at 32x32, for 2.6x the time per epoch (bench/accuracy.md).
IMAGENET_STEM_INPUT_SIZE = 48
# --recipe cpu: progressive resizing, 9 of 16 epochs at 32x32 in float32 (about 60 s each here) and the rest
# at 48x48 in bf16 (about 100 s). From scratch, seed 0 reached 84.10% in 1,336 s, between two runs of the
# default at 48x48 for 8 epochs (80.69%) in 1,558 and 1,320 s; 9 + 6 at 56x56, 83.76% (bench/accuracy.md)
CPU_INPUT_SIZE = 48
# Training's own memory, roughly, for the check before decoding: the activations a step keeps for the
# backward pass, about 500 bytes per input pixel of the batch with torchvision's stem (a review measured
# 16.8 GB at 1024x1024, batch 32), 16x that with the cifar stem, whose maps are 4x larger on each side.
ACTIVATION_BYTES_PER_PIXEL = 500
# --lr and --backbone-lr-mult: far above any that trains (--lr 100 went to NaN in one epoch here, said in
# one line), and their product stays a float32, which the optimizer's step needs (1e308 crashed it)
MAX_LR = 100
# --mixup/--cutmix: Beta(alpha, alpha) is 0.5 +- 0.01 at 1000 already, so larger alphas only mix halves;
# above float32's 3.4e38 data.mix's gamma draws cannot be made at all (a crash at the first step)
MAX_MIX_ALPHA = 1000
# --epochs: 200 times the seed's 50; a typo's 1e11 would hold the lr at its peak for as long as it ran
MAX_EPOCHS = 10_000
LOG_EVERY = 20  # steps between reads of the loss, for the progress bar and trackers (each read waits for the device)
VAL_BATCH_SIZE = 1024
# --compile: inductor's default mode fuses BatchNorm, ReLU and the residual adds of the training step.
# reduce-overhead and max-autotune add CUDA graphs and kernel autotuning: nothing on a CPU but compile
# time; on a GPU, max-autotune may be worth the longer compile (untested here: bench/speed.md).
COMPILE_MODE = "default"
FIRST_SAYS_IT_S = 10  # let_the_first_say_it at most: the launcher stops the process once the first one ends


def main(argv=None):
    try:
        with data.quiet_when_closed():  # `train.py | head`: the run goes on, quietly, to its end
            train(parse_args(argv))
    except UserError as error:
        leave_process_group()
        if int(os.environ.get("RANK", 0)):  # several processes meet the same input: the first one says it
            let_the_first_say_it()
            sys.exit(1)
        sys.exit(f"error: {' '.join(str(error).split())}")  # one line, whatever the message
    except KeyboardInterrupt:  # before training started; from then on StopRequest handles it
        sys.exit(130)


def train(args):
    accelerator, why = make_accelerator(args)  # sets args.mixed_precision
    if args.find_lr:
        return find_lr(args, accelerator)
    precision = args.mixed_precision
    args, out, progress = open_run(args, accelerator)
    if args is None:  # a resumed run with nothing left to train
        return
    args.mixed_precision = precision  # recorded: a resumed run keeps it
    if why:  # said once the run is not refused: a refusal is one line
        accelerator.print(f"precision: {why}")
    run = prepare_training(args, progress, accelerator)  # the data, network, optimizer, schedule and loss
    start_run(run, args, out, progress, accelerator)
    stop = StopRequest(accelerator)
    try:  # the lock is let go of at the end, also when train() is called again in one process
        if progress:
            load_progress(run, progress, accelerator)
        else:  # a state before the first step, so that even a run killed in epoch 1 resumes
            save_state(accelerator, run.out, dict(config=vars(args), history=[]))
        for epoch in range(len(run.history) + 1, args.epochs + 1):
            run.train_loader.set_epoch(epoch)
            started = time.perf_counter()
            result = train_epoch(epoch, run, accelerator, args, stop)
            seconds = time.perf_counter() - started
            if result is None:
                accelerator.print(
                    f"\nstopped during epoch {epoch}; {run.out} holds the state from before it. Resume with:\n"
                    f"  {run.resume_command}"
                )
                sys.exit(130)
            scores, logits, labels = validate(run, accelerator)
            record = dict(
                epoch=epoch,
                train_loss=result[0],
                train_acc=result[1],
                **scores,
                lr=run.scheduler.get_last_lr()[-1],
                input_size=epoch_input_size(args, epoch),
                precision=run.precision,  # a resumed run may change it (accelerate launch)
                seconds=round(seconds, 2),
            )
            improved = end_epoch(run, record, args, accelerator, (logits, labels))
            accelerator.print(
                f"epoch {epoch:3d}/{args.epochs}  train loss {result[0]:.4f} acc {result[1]:6.2%}  "
                f"val loss {record['val_loss']:.4f} acc {record['val_acc']:6.2%}  {seconds:6.1f}s "
                f"({run.images_per_epoch / seconds:.3g} img/s){'  *best' if improved else ''}"
            )
            if patience_ran_out(args, run.history):
                best = best_record(run.history)["epoch"]
                accelerator.print(
                    f"early stop: no lower validation loss in the {epoch - best} epoch(s) since epoch {best}"
                )
                break
    except (OSError, SafetensorError) as error:  # safetensors reports a full disk as its own error
        code = getattr(error, "errno", None)
        full = code == errno.ENOSPC or "No space left" in str(error)
        advice = "Free space" if full else "Make the folder writable" if code else "Free space, or make it writable"
        raise UserError(
            f"could not write to {run.out} ({getattr(error, 'strerror', None) or error}); the files written before "
            f"are whole. {advice}, then resume: {run.resume_command}"
        ) from error
    finally:
        if run.lock is not None:
            run.lock.close()
    accelerator.end_training()
    accelerator.print(final_summary(run.out, args, run.history, run.classes))


def prepare_training(args, progress, accelerator, schedule=None):
    """The data, and the model with its optimizer, schedule and loss, wrapped by accelerate: what both
    training and the lr range test need. schedule: see build_training."""
    set_seed(args.seed)
    precision = PRECISION_WORDS.get(args.mixed_precision, f"{args.mixed_precision} mixed precision")
    accelerator.print(
        f"{accelerator.num_processes} process(es) ({accelerator.distributed_type.value}) on {accelerator.device}, "
        f"{torch.get_num_threads()} CPU thread(s) each, {precision}"
    )
    run = SimpleNamespace(progress=progress)
    run.train_loader, run.val_loader, train_labels, run.classes = load_data(args, accelerator)
    run.targeted = torch.tensor(data.class_indices(args.targeted_augment, run.classes), device=accelerator.device)
    run.resized_crop = args.input_size if args.train_crop == "random-resized" else None
    run.groups = two_stage_groups(run.classes) if args.two_stage else None
    # sharded first: the schedule counts the batches each process gets (build_training)
    run.train_loader, run.val_loader = accelerator.prepare(run.train_loader, run.val_loader)
    network, optimizer, scheduler, run.criterion, run.change = build_training(
        args, run, train_labels, progress, accelerator, schedule
    )
    run.model, run.optimizer, run.scheduler = accelerator.prepare(network, optimizer, scheduler)
    run.images_per_epoch = len(run.train_loader) * effective_batch(args, accelerator)  # drop_last
    return run


def build_training(args, run, train_labels, progress, accelerator, schedule=None):
    """(network, optimizer, scheduler, criterion, what extending a resumed run changes or None).
    schedule: step -> lr factor, instead of the recipe's (--find-lr)."""
    if getattr(args, "loss_weights", None) is None:  # a resumed run keeps the weights it computed
        weights = class_weights(args.class_weights, train_labels, run.classes)
        args.loss_weights = None if weights is None else weights.tolist()
        # the file's bytes: a resume may name it at a new place (same_setting)
        args.class_weights_digest = data.file_digest(args.class_weights) if Path(args.class_weights).is_file() else None
    loss_weights = None if args.loss_weights is None else torch.tensor(args.loss_weights)
    if loss_weights is not None:
        weights = ", ".join(f"{name} {w:.3g}" for name, w in zip(run.classes, loss_weights.tolist()))
        accelerator.print(f"class weights: {weights}")
    weights = "none" if progress else args.weights  # a resumed run's weights come from its state
    network = build_model(len(run.classes), args.stem, weights, run.groups, args.zero_init_residual)
    network = network.to(memory_format=torch.channels_last)
    separate = args.freeze_epochs or args.backbone_lr_mult != 1  # the backbone in groups of its own
    groups = parameter_groups(
        network, args.weight_decay, args.lr, args.lr * args.backbone_lr_mult if separate else None
    )
    optimizer = torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, nesterov=args.nesterov)
    same_optimizer(args, progress, optimizer)
    # Counted in scheduler steps: a loader batch is one optimizer step (batch_size x grad_accum_steps images
    # a process), and accelerate steps the scheduler once a process for each. A process's loader holds its
    # shard: 3 batches on 2 processes are 1 each, 2 steps an epoch, not 3 (with 3 the lr never reached 0).
    steps_per_epoch = len(run.train_loader) * accelerator.num_processes
    warmup_steps = round(args.warmup_epochs * steps_per_epoch)
    change = None
    if progress and args.epochs != progress["config"]["epochs"]:
        saved_epochs, done = progress["config"]["epochs"], len(progress["history"])
        change = extend_schedule(args, saved_epochs, done, steps_per_epoch, warmup_steps)
    total_steps = args.epochs * steps_per_epoch

    def recipe(step):
        return lr_factor(step, total_steps, warmup_steps, args.schedule, args.decay_start)

    def backbone(step):  # --freeze-epochs: from the unfreeze, a warmup of its own, not the peak at once
        since = step - args.freeze_epochs * steps_per_epoch
        ramp = 1.0 if warmup_steps == 0 else min(1.0, (since + 1) / warmup_steps)
        return recipe(step) * ramp if since >= 0 else 0.0

    schedule = schedule or ([backbone, backbone, recipe, recipe] if args.freeze_epochs else recipe)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    criterion = torch.nn.CrossEntropyLoss(weight=loss_weights, label_smoothing=args.label_smoothing)
    return network, optimizer, scheduler, criterion.to(accelerator.device), change


def lr_factor(step, total_steps, warmup_steps, schedule, decay_start=None):
    """Linear warmup, then the schedule's decay (linear after a linear warmup is the one-cycle
    triangle). decay_start=(step, factor): the decay starts there from that factor instead, as when a
    resumed run's --epochs moves its end (see extend_schedule)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    start, factor = decay_start or (warmup_steps, 1.0)
    progress = min(1.0, (step - start) / max(1, total_steps - start))  # 0 to 1 over the decay
    return factor * SCHEDULES[schedule](progress)


# --schedule: the lr factor after warmup, a function of the decay's progress, so that a resumed run with
# more --epochs goes on from where its lr stands. A new one here is a new --schedule value.
SCHEDULES = {
    "cosine": lambda progress: 0.5 * (1 + math.cos(math.pi * progress)),
    "linear": lambda progress: 1.0 - progress,
    "constant": lambda progress: 1.0,
    # "step": lambda progress: 0.1 ** ((progress >= 0.5) + (progress >= 0.75)),
}


def parameter_groups(network, weight_decay, lr, backbone_lr=None):
    """Weight decay on conv and linear weights only: decaying norms and biases only hurts. With
    backbone_lr, every layer but the head has its own two groups, first, at that lr."""
    named = list(network.named_parameters())
    parts = [(named, lr)]
    if backbone_lr is not None:
        parts = [([(n, p) for n, p in named if not is_head(n)], backbone_lr)]
        parts.append(([(n, p) for n, p in named if is_head(n)], lr))
    return [
        {"params": [p for _, p in params if (p.ndim > 1) == decayed], "lr": part_lr, "weight_decay": decay}
        for params, part_lr in parts
        for decayed, decay in ((True, weight_decay), (False, 0.0))
    ]


def train_epoch(epoch, run, accelerator, args, stop):
    """One pass over the training split. Returns (loss, accuracy) or None when stopped early. Nothing
    but the loss (and the gradient norm) every LOG_EVERY steps is read back from the device, so on a
    GPU the host queues the next steps while the device runs this one."""
    loader, scheduler = run.train_loader, run.scheduler
    training_mode(run, args, epoch, accelerator)
    # Augmentation randomness depends only on (seed, epoch, process), so a resumed epoch replays exactly.
    generator = torch.Generator(accelerator.device).manual_seed(
        args.seed * 100_000 + epoch * 100 + accelerator.process_index
    )
    total_loss = torch.zeros((), device=accelerator.device)
    correct = torch.zeros((), dtype=torch.long, device=accelerator.device)
    bar = tqdm(loader, desc=f"epoch {epoch}/{args.epochs}", leave=False, disable=not accelerator.is_local_main_process)
    for step, (images, labels) in enumerate(bar, 1):
        if step == 2:
            started = time.perf_counter()  # the time estimate leaves out the first step, which compiles
        loss, cross_entropy, hits, grad_norm = train_step(run, accelerator, args, images, labels, generator)
        global_step = (epoch - 1) * len(loader) + step
        if run.ema is not None:
            update_ema(run.ema, accelerator.unwrap_model(run.model, keep_torch_compile=False), global_step, args.ema)
        total_loss += cross_entropy
        correct += hits
        if step % LOG_EVERY == 0 or step == len(loader):
            value, lr = loss.item(), scheduler.get_last_lr()[-1]  # the last group's: the head's
            if not math.isfinite(value):
                kept = "the last checkpoint is untouched" if epoch > 1 else "no checkpoint was written"
                raise UserError(
                    f"the loss is {value} at epoch {epoch}, step {step}; {kept}. Lower --lr and start again "
                    f"with --overwrite"
                )
            bar.set_postfix(loss=f"{value:.3f}", lr=f"{lr:.4g}")
            norm = {} if grad_norm is None else {"step/grad_norm": grad_norm.item()}  # before clipping
            accelerator.log({"step/loss": value, "step/lr": lr} | norm, step=global_step)
            if step == min(LOG_EVERY, len(loader)) > 1 and stop.estimate and accelerator.is_main_process:
                stop.estimate = False
                seconds = (time.perf_counter() - started) / (step - 1) * len(loader)
                estimate = time_estimate(seconds, epoch, args, accelerator)
                if estimate:
                    tqdm.write(estimate)
        if stop.requested and accelerator.check_trigger():
            return None
    total_loss, correct = accelerator.reduce(total_loss, "sum"), accelerator.reduce(correct, "sum")
    seen = len(loader) * effective_batch(args, accelerator)  # full batches only: drop_last
    return total_loss.item() / seen, correct.item() / seen


def training_mode(run, args, epoch, accelerator):
    """The model in training mode as epoch trains it: within --freeze-epochs, only the head; within
    --small-epochs, fed (and validated) at the images' stored size (progressive resizing), and in
    float32 where --recipe cpu chose bf16 (LARGE_EPOCHS_BF16)."""
    run.model.train()
    run.precision, run.autocast = accelerator.mixed_precision, accelerator.autocast  # as launched
    if args.mixed_precision == LARGE_EPOCHS_BF16:
        large = epoch > args.small_epochs
        run.precision = "bf16" if large else "no"
        run.autocast = functools.partial(torch.autocast, accelerator.device.type, torch.bfloat16, enabled=large)
    if args.freeze_epochs:
        freeze_backbone(accelerator.unwrap_model(run.model, keep_torch_compile=False), epoch <= args.freeze_epochs)
    size = epoch_input_size(args, epoch)
    # evaluation's preprocessing at this epoch's size; training's is data.augment, in train_step, then this
    run.normalize = data.normalizer(args.mean, args.std, size, accelerator.device, crop=args.eval_crop)


def epoch_input_size(args, epoch):
    """The network's input side in this epoch: --small-epochs train at the stored size, the rest at --input-size."""
    return args.image_size if epoch <= args.small_epochs else args.input_size


def train_step(run, accelerator, args, images, labels, generator):
    """One optimizer step on a loader batch, in grad_accum_steps parts, each augmented, mixed, sent
    forward and backward; accelerate adds up their gradients. Returns device tensors: the loss, the
    summed cross-entropy and the hits (against each image's larger share's label), and the gradient
    norm before clipping (None without --clip-grad-norm)."""
    step_loss, cross_entropy, hits, grad_norm = 0, 0, 0, None
    # the loader's batches are whole (drop_last), so each splits into grad_accum_steps parts of batch_size
    for part_images, part_labels in zip(images.chunk(args.grad_accum_steps), labels.chunk(args.grad_accum_steps)):
        images = data.augment(
            part_images, part_labels, generator, args.crop_padding, run.targeted, run.resized_crop, args.auto_augment
        )
        partner, share = part_labels, None  # share: of each image's own label, when mixed
        if args.mixup or args.cutmix:
            images, partner, share = data.mix(images, part_labels, generator, args.mixup, args.cutmix)
        inputs = run.normalize(images)
        with accelerator.accumulate(run.model):
            with run.autocast():
                logits = run.model(inputs)
                loss = run.criterion(logits, part_labels)
                if share is not None:  # mixed: each label's loss by its share, with smoothing and weights as set
                    loss = share * loss + (1 - share) * run.criterion(logits, partner)
            accelerator.backward(loss)
            if accelerator.sync_gradients and args.clip_grad_norm:  # the last part: the whole gradient is in
                grad_norm = accelerator.clip_grad_norm_(run.model.parameters(), args.clip_grad_norm)
            run.optimizer.step()  # accelerate steps (and zeroes) only at the last part
            run.scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
        measured = part_labels if share is None else torch.where(share >= 0.5, part_labels, partner)
        step_loss = step_loss + loss.detach() / args.grad_accum_steps
        cross_entropy = cross_entropy + F.cross_entropy(logits.detach().float(), measured, reduction="sum")
        hits = hits + (logits.argmax(1) == measured).sum()
    return step_loss, cross_entropy, hits, grad_norm


@torch.inference_mode()
def validate(run, accelerator):
    """Loss, accuracy and per-class accuracy of run.evaluated over the whole validation split, every sample
    counted once. The values stay on the device until the end: no batch waits for the one before."""
    network = run.evaluated
    network.eval()
    sync_batchnorm_statistics(network, accelerator)
    total_loss = torch.zeros((), device=accelerator.device)
    hits_per_class = torch.zeros(len(run.classes), device=accelerator.device)
    samples_per_class = torch.zeros(len(run.classes), device=accelerator.device)
    all_logits, all_labels = [], []
    for images, labels in run.val_loader:
        with run.autocast():
            logits = network(run.normalize(images)).float()
        losses = F.cross_entropy(logits, labels, reduction="none")
        losses, hits, labels, logits = accelerator.gather_for_metrics(
            (losses, logits.argmax(1) == labels, labels, logits)
        )
        all_logits.append(logits)
        all_labels.append(labels)
        total_loss += losses.sum()
        # not bincount: on a GPU it reads the largest label back to size its output
        hits_per_class.index_add_(0, labels, hits.float())
        samples_per_class.index_add_(0, labels, torch.ones_like(hits, dtype=samples_per_class.dtype))
    count = samples_per_class.sum().item()
    scores = dict(
        val_loss=total_loss.item() / count,
        val_acc=hits_per_class.sum().item() / count,
        val_samples=int(count),
        val_per_class=(hits_per_class / samples_per_class.clamp(min=1)).tolist(),
    )
    return scores, torch.cat(all_logits), torch.cat(all_labels)


def end_epoch(run, record, args, accelerator, validated):
    """The epoch's record into the history and the trackers; last.safetensors, best.safetensors when
    the validation loss is the lowest so far (with the temperature fitted on validated: logits and
    labels), history.json and the state. Returns whether it improved; a non-finite loss stops the run."""
    if not math.isfinite(record["val_loss"]):
        kept = f"best.safetensors (epoch {best_record(run.history)['epoch']}) is kept" if run.history else ""
        raise UserError(
            f"the validation loss is {record['val_loss']} after epoch {record['epoch']}; "
            f"{kept or 'no checkpoint was saved'}. Lower --lr and start again with --overwrite"
        )
    run.history.append(record)
    # numbers only: one value a class below, and the precision is in the run's config
    tracked = {key: value for key, value in record.items() if key not in ("val_per_class", "precision")}
    tracked |= {f"val_acc/{name}": acc for name, acc in zip(run.classes, record["val_per_class"])}
    accelerator.log(tracked, step=record["epoch"] * len(run.train_loader))
    improved = best_record(run.history) is record
    if accelerator.is_main_process:
        metadata = checkpoint_metadata(args, run.classes, run.groups, accelerator, record) | calibrate(*validated)
        save_checkpoint(run.evaluated, run.out / "last.safetensors", metadata)
        if improved:
            save_checkpoint(run.evaluated, run.out / "best.safetensors", metadata)
        write_json(run.out / "history.json", run.history)
    save_state(accelerator, run.out, dict(config=vars(args), history=run.history))
    return improved


@torch.no_grad()
def update_ema(ema, network, step, decay):
    """ema <- decay * ema + (1 - decay) * network, with the decay ramped up as (1 + step) / (10 + step)
    (TensorFlow's ExponentialMovingAverage with num_updates) so the random initial weights fade out
    fast. BatchNorm statistics are averaged too; its batch counters are copied."""
    decay = min(decay, (1 + step) / (10 + step))
    pairs = list(zip(ema.state_dict().values(), network.state_dict().values()))
    floating = [pair for pair in pairs if pair[0].is_floating_point()]
    counters = [pair for pair in pairs if not pair[0].is_floating_point()]
    torch._foreach_lerp_(*zip(*floating), 1 - decay)  # one call for every tensor
    if counters:
        torch._foreach_copy_(*zip(*counters))


def start_run(run, args, out, progress, accelerator):
    """The rest of what the loop needs: the network validated and saved (run.evaluated: the EMA copy
    with --ema) and the run folder (made and locked)."""
    network = accelerator.unwrap_model(run.model, keep_torch_compile=False)  # also under --dynamo_backend
    # The EMA copy is not wrapped for data parallel: every process updates it from the same weights.
    run.ema = copy.deepcopy(network).requires_grad_(False) if args.ema else None
    if run.ema is not None:
        accelerator.register_for_checkpointing(run.ema)
    # Validated and saved: uncompiled (compiling validation too would cost a compilation per batch size),
    # so with torchvision's names.
    run.evaluated = run.ema if run.ema is not None else network
    if args.compile:  # last, as accelerate's own; the state it saves keeps the names of the uncompiled model
        run.model = torch.compile(run.model, mode=COMPILE_MODE)
    run.out, run.lock = start_output_dir(out, args.resume, args.overwrite, accelerator)
    args.output_dir = str(run.out)
    run.resume_command = resume_command(run.out, accelerator, flags=given_anew(args, progress))
    start_trackers(accelerator, run.out, args)
    accumulated = f" x {args.grad_accum_steps} accumulated" if args.grad_accum_steps > 1 else ""
    accelerator.print(
        f"recipe: {args.recipe}, {args.arch} with {args.optimizer}, {args.epochs} epochs, batch {args.batch_size} "
        f"per process{accumulated} (effective {effective_batch(args, accelerator)}), lr {args.lr} ({args.schedule}, "
        f"{args.warmup_epochs} warmup), weights {args.weights}, stem {args.stem}, input {args.input_size}x"
        f"{args.input_size}{', compiled' if args.compile else ''}{training_controls(args)}\noutput: {run.out}"
    )
    run.history = []


def load_progress(run, progress, accelerator):
    """A resumed run's state (weights, optimizer, schedule, random generators) and history."""
    try:
        accelerator.load_state(run.out / "state")
    except Exception as error:  # a damaged file: torch's, safetensors' or pickle's own error
        raise UserError(damaged_state(run.out, run.out / "state", error)) from error
    run.history = progress["history"]
    change = f"; {run.change}" if run.change else ""
    done = f"after epoch {len(run.history)}" if run.history else "from its start (no epoch had finished)"
    accelerator.print(f"resumed {run.out} {done}{change}")


# ---------------------------------------------------------------------------------- settings and flags


RECIPE_NAMES = ("default", "seed", "cpu")  # the recipes: see RECIPES
# The flags that are not recipe settings: (flag, argparse's settings, help).
# fmt: off
FLAGS = [
    ("--data-dir", dict(type=data.path_flag),
     "CIFAR-10 location, or a folder with train/<class>/ (./data; --resume: the run's)"),
    ("--output-dir", dict(type=data.path_flag), "the run's folder (default runs/<timestamp>)"),
    ("--recipe", dict(choices=RECIPE_NAMES, default="default"),
     "the settings' values: default, seed (the write-up's) or cpu (sized for a CPU) (%(default)s)"),
    ("--weights", dict(type=data.path_flag, default="imagenet"),
     f"imagenet, none, or a local torchvision {model.ARCH} state dict (%(default)s)"),
    ("--seed", dict(type=bounded(int, 0, 2**32 - 1), default=0), "split, order and augmentation (%(default)s)"),
    ("--val-fraction", dict(type=bounded(float, 0, 1, open_low=True, open_high=True)),
     f"stratified, unless DIR/val/ is the validation split ({VAL_FRACTION})"),
    ("--max-train-samples", dict(type=bounded(int, 1)), "a stratified subset of about N training images (all)"),
    ("--patience", dict(type=bounded(int, 1)), "stop after N epochs without a lower validation loss (off)"),
    ("--targeted-augment", dict(type=data.classes_flag, default="none"),
     "rotation, jitter, erasing for: none, all, a group or classes (none)"),
    ("--class-weights", dict(type=data.path_flag, default="none"),
     "none, auto, a run's history.json or checkpoint, or w0,w1,... (none)"),
    ("--two-stage", dict(action="store_true"), "animals-vs-vehicles head, then a head per group (off)"),
    ("--resume", dict(action="store_true"), "continue the run in --output-dir (may change: --epochs, --data-dir, "
     "--cache-dir, --data-on, --compile, --log-with)"),
    ("--overwrite", dict(action="store_true"), "replace the run in --output-dir"),
    ("--ema", dict(type=bounded(float, 0, 1, open_high=True), default=0.0), "EMA decay of the weights (0: off)"),
    ("--cache-dir", dict(type=data.path_flag), "where image folders are decoded once, to be read by later runs; "
     f"none: decode in memory each time ({data.default_cache_dir()})"),
    ("--data-on", dict(choices=["auto", "device", "disk"], default="auto"), "device: the images in the training "
     "device's memory; disk: read batch by batch from the cache; auto: device when they fit (%(default)s)"),
    ("--compile", dict(action="store_true"), f"torch.compile the training step, mode {COMPILE_MODE} (off)"),
    # the training controls: their defaults leave the recipes as they are
    ("--grad-accum-steps", dict(type=bounded(int, 1), metavar="N", default=1), "batches whose gradients add up "
     "before each step: an effective batch of --batch-size x processes x N (%(default)s)"),
    ("--clip-grad-norm", dict(type=bounded(float, 0, open_low=True), metavar="X"),
     "clip the gradient's norm to this (off)"),
    ("--mixup", dict(type=bounded(float, 0, MAX_MIX_ALPHA), metavar="ALPHA", default=0.0),
     "mixup's alpha: mix pairs of images (0: off)"),
    ("--cutmix", dict(type=bounded(float, 0, MAX_MIX_ALPHA), metavar="ALPHA", default=0.0),
     "CutMix's alpha; with --mixup, each batch takes one of the two at random (0: off)"),
    ("--auto-augment", dict(choices=["none", "ta_wide", "ra"], default="none"),
     "an augmentation policy: TrivialAugment-wide or RandAugment (%(default)s)"),
    ("--freeze-epochs", dict(type=bounded(int, 0), metavar="N", default=0),
     "train only the new head for N epochs first (0)"),
    ("--small-epochs", dict(type=bounded(int, 0), metavar="N"), "progressive resizing: the first N epochs at the "
     "stored size of CIFAR-sized images, not upsampled to --input-size (0; cpu recipe: 9/16 of --epochs)"),
    ("--backbone-lr-mult", dict(type=bounded(float, 0, MAX_LR, open_low=True), metavar="M", default=1.0),
     "the lr of every layer but the head, times this (%(default)s)"),
    ("--find-lr", dict(action="store_true"), "run the lr range test, write lr_find.png, and train nothing"),
    ("--log-with", dict(choices=[str(t) for t in LoggerType]), "also log to this tracker, through accelerate (none)"),
    ("--input-size", dict(type=bounded(int, 8, 1024)), f"the network's input side. CIFAR-sized images stay "
     f"{data.IMAGE_SIZE}x{data.IMAGE_SIZE} in memory and are resized per batch (default {data.IMAGE_SIZE}; "
     f"with --stem imagenet {IMAGENET_STEM_INPUT_SIZE}, {CPU_INPUT_SIZE} in the cpu recipe, {data.IMAGE_SIZE} in "
     f"the seed's); photos are stored a little larger ({round(data.PHOTO_INPUT_SIZE * data.STORED_SCALE)} for "
     f"{data.PHOTO_INPUT_SIZE}) and cropped to it (default {data.PHOTO_INPUT_SIZE})"),
]
# The recipes, a row a setting: (flag, argparse's settings, its value in each of RECIPE_NAMES, help). The
# seed recipe is the write-up's, 81.92% after 50 epochs; cpu is default's, sized for a CPU: torchvision's stem,
# 9 of 16 epochs at 32x32 and the rest upsampled to 48x48 (data_settings), those in bf16 where the CPU has it
# (chosen_precision). A flag given wins.
RECIPES = [
    ("--epochs", dict(type=bounded(int, 1, MAX_EPOCHS)), (30, 50, 16), "passes over the training split"),
    ("--batch-size", dict(type=bounded(int, 2)), (128, 128, 128),
     f"per process, 2 or more for BatchNorm; {PHOTO_BATCH_SIZE} for photos"),
    # the peak, after warmup: fine-tuning, so below the from-scratch 0.1
    ("--lr", dict(type=bounded(float, 0, MAX_LR, open_low=True)), (0.05, 1e-3, 0.05),
     f"peak; {SCRATCH_LR} with --weights none (but seed); photos: x --batch-size/128"),
    ("--momentum", dict(type=bounded(float, 0, 1, open_high=True)), (0.9, 0.9, 0.9), "SGD momentum"),
    ("--nesterov", dict(action=argparse.BooleanOptionalAction), (True, False, True), "Nesterov momentum"),
    ("--weight-decay", dict(type=bounded(float, 0, 1)), (5e-4, 0.0, 5e-4), "not on norms and biases"),
    ("--schedule", dict(choices=list(SCHEDULES)), ("cosine", "constant", "cosine"), "after warmup"),
    ("--warmup-epochs", dict(type=bounded(float, 0, 1000)), (1, 0, 1), "linear warmup"),
    ("--label-smoothing", dict(type=bounded(float, 0, 1, open_high=True)), (0.1, 0.0, 0.1),
     "of the cross-entropy targets"),
    # from scratch it helps at a high lr, and slows the seed's lr 0.001 down
    ("--zero-init-residual", dict(action=argparse.BooleanOptionalAction), (True, False, True),
     "residual blocks start as the identity"),
    # photos get torchvision's own (data_settings)
    ("--stem", dict(choices=["cifar", "imagenet"]), ("cifar", "imagenet", "imagenet"),
     "cifar: stride-1 conv1, no max-pool; imagenet for photos"),
    # measured: +2.2 points over 4 in 8 epochs from scratch (bench/accuracy.md)
    ("--crop-padding", dict(type=bounded(int, 0, 32)), (2, 4, 2), "CIFAR-sized images: the random crop's zero padding"),
    # not flags: the data's own (CIFAR-10's, or ImageNet's for photos: data_settings), or the seed's 0.5
    ("mean", None, (None, (0.5, 0.5, 0.5), None), None),
    ("std", None, (None, (0.5, 0.5, 0.5), None), None),
    # not flags: with torchvision's stem, CIFAR-sized images are upsampled to this side (--input-size), after
    # this share of the epochs at their own (--small-epochs). cpu: bench/accuracy.md, "A CPU recipe"
    ("upsampled_side", None, (IMAGENET_STEM_INPUT_SIZE, None, CPU_INPUT_SIZE), None),
    ("small_share", None, (0, 0, Fraction(9, 16)), None),
]
# Flag combinations refused as the command line is read: (refused when, the one line that says why).
RESUME_REFUSALS = [
    (lambda a: not a.output_dir, "--resume needs --output-dir, the folder of the run to continue"),
    (lambda a: a.overwrite, "--resume continues the run in --output-dir and --overwrite replaces it; pass one of them"),
    (lambda a: a.find_lr, "--find-lr saves no run, so there is none to resume; drop --resume"),
]
# refused as typed, before the recipe fills in the values not given
AS_GIVEN_REFUSALS = [
    (lambda a: a.val_fraction is not None and data.val_folder_in(a.data_dir),
     lambda a: f"--val-fraction cuts the validation split from train/, and {data.val_folder_in(a.data_dir)} is the "
               f"validation split here; drop --val-fraction"),
    (lambda a: a.zero_init_residual is not None and a.weights != "none",
     lambda a: f"--{'' if a.zero_init_residual else 'no-'}zero-init-residual sets how a network starts from "
               f"scratch, and --weights {a.weights} loads every weight over it; drop it, or pass --weights none"),
    (lambda a: a.find_lr and idle_in_find_lr(a),
     lambda a: f"--find-lr runs the lr range test, with an lr schedule of its own, and trains no run, so "
               f"{' and '.join(idle_in_find_lr(a))} would do nothing; drop {' and '.join(idle_in_find_lr(a))}"),
]
REFUSALS = [
    (lambda a: a.weights == "none" and protecting(a),
     lambda a: f"{' and '.join(protecting(a))} protect(s) pretrained features, and --weights none has none; "
               f"drop {' and '.join(protecting(a))}"),
    (lambda a: a.nesterov and a.momentum == 0,
     "Nesterov momentum needs a --momentum above 0; pass one, or --no-nesterov for plain SGD"),
    (lambda a: a.freeze_epochs >= a.epochs,
     lambda a: f"--freeze-epochs {a.freeze_epochs} leaves none of the {a.epochs} epochs to train the whole "
               f"network; pass fewer, or more --epochs"),
    (lambda a: (a.small_epochs or 0) >= a.epochs,
     lambda a: f"--small-epochs {a.small_epochs} leaves none of the {a.epochs} epochs at --input-size; pass fewer, "
               f"or more --epochs"),
    (lambda a: a.warmup_epochs > a.epochs,
     lambda a: f"--warmup-epochs {a.warmup_epochs:g} is longer than the run's {a.epochs} epochs: the lr would never "
               f"reach its peak; pass fewer, or more --epochs"),
]
# fmt: on


def dest(flag):
    """argparse's attribute for a flag ("--grad-accum-steps": grad_accum_steps); a recipe's other rows
    ("mean") are their own."""
    return flag.lstrip("-").replace("-", "_")


def flag_of(key):
    """The flag for argparse's attribute (grad_accum_steps: "--grad-accum-steps"), as a command names it."""
    return "--" + key.replace("_", "-")


RECIPE_VALUES = {name: {dest(flag): values[i] for flag, _, values, _ in RECIPES} for i, name in enumerate(RECIPE_NAMES)}
FLAG_DEFAULTS = {flag: kind.get("default", False if kind.get("action") else None) for flag, kind, _ in FLAGS}


def changed(args, *flags):
    """The flags among these whose values are not their defaults."""
    return [flag for flag in flags if getattr(args, dest(flag)) != FLAG_DEFAULTS[flag]]


def protecting(args):
    return changed(args, "--freeze-epochs", "--backbone-lr-mult")


def idle_in_find_lr(args):
    """Flags given that the range test does not use (recipe settings not typed are still None). --epochs
    is used by the cpu recipe alone: it sets --small-epochs, and so the size the test trains at."""
    epochs = () if args.recipe == "cpu" and args.small_epochs is None else ("--epochs",)
    typed = [flag for flag in ("--schedule", "--warmup-epochs", *epochs) if getattr(args, dest(flag)) is not None]
    return changed(args, "--patience", "--ema", "--compile", "--log-with", "--overwrite") + typed


def parse_args(argv=None):
    # a recipe's row without argparse settings is no flag: its value comes from --recipe (data_settings)
    in_each = [", ".join(f"{name} {value}" for name, value in zip(RECIPE_NAMES, row[2])) for row in RECIPES]
    recipes = [(flag, kind, f"{text} ({each})") for (flag, kind, _, text), each in zip(RECIPES, in_each) if kind]
    parser = data.parser_of(__doc__, FLAGS + recipes)
    args = parser.parse_args(argv)
    # recorded absolute, so that evaluate.py and --resume find it from any working folder
    absolute_paths(vars(args))
    if args.resume:  # the run's saved settings apply; see resumed_settings
        data.refuse(parser, args, RESUME_REFUSALS)
        # the flags on the command line, to compare with the run's own values once they are read
        unset = object()
        parser.set_defaults(**dict.fromkeys(vars(args), unset))
        args.given = {key: value for key, value in vars(parser.parse_args(argv)).items() if value is not unset}
        absolute_paths(args.given)
        return args
    args.data_dir = args.data_dir or data.absolute(data.DEFAULT_DATA_DIR)
    # by default runs/<timestamp> is made in the working folder, --find-lr's plot written there
    out = args.output_dir or ("." if args.find_lr else "runs")
    data.check_outside_splits(out, [args.data_dir], "--output-dir" if args.output_dir else "the default --output-dir")
    if args.cache_dir not in (None, "none"):  # the new run's own state/ is not made yet: no progress.json marks it
        states = [Path(out) / name for name in data.STATE_DIRS]
        data.check_outside_states(args.cache_dir, "--cache-dir", args.cache_dir, states)
    args.arch = model.ARCH  # recorded with the run; the optimizer's class too (same_optimizer)
    data.refuse(parser, args, AS_GIVEN_REFUSALS)
    args.val_fraction = args.val_fraction or VAL_FRACTION
    recipe = RECIPE_VALUES[args.recipe]
    data_dependent = ("stem", "batch_size", "lr", "crop_padding", "upsampled_side", "small_share")  # data_settings
    for key, value in recipe.items():
        if getattr(args, key, None) is None and key not in data_dependent:
            setattr(args, key, value)
    args.decay_start = None  # set when a resumed run's --epochs changes; see lr_factor
    data.refuse(parser, args, REFUSALS)
    if args.weights not in ("imagenet", "none"):
        model.check_weights_file(args.weights)
    check_class_weights(args.class_weights)
    return args


def absolute_paths(settings):
    """The files and folders among the settings ({name: value}), made absolute: recorded so, the run
    finds them again, and the command that started it matches, from any working folder. A moved
    --class-weights run too: the resumed run keeps the weights it computed."""
    words = dict(data_dir=(), cache_dir=("none",), weights=("imagenet", "none"), class_weights=("none", "auto"))
    for key, not_paths in words.items():
        value = settings.get(key)
        if value and value not in not_paths and not (key == "class_weights" and weight_list(value)):
            settings[key] = data.absolute(value)


def data_settings(args, typical_side):
    """The settings that depend on the images' median shorter side (the sizes: see data.SMALL_SIDE). Photos
    also get torchvision's stem (the cifar stem would cost 16x the compute at 224 for nothing) and a
    smaller batch. Flags given explicitly win. Returns the rule applied, in words."""
    photos = typical_side > data.SMALL_SIDE
    small = max(data.IMAGE_SIZE, typical_side)  # the side CIFAR-sized and small images are kept at
    recipe = RECIPE_VALUES[args.recipe]
    args.batch_size = args.batch_size or (PHOTO_BATCH_SIZE if photos else recipe["batch_size"])
    if args.lr is None:
        args.lr = SCRATCH_LR if args.recipe != "seed" and args.weights == "none" else recipe["lr"]
        if photos:  # --batch-size 32 typed is the default's lr too
            args.lr *= args.batch_size / recipe["batch_size"]
    if photos:
        if args.crop_padding is not None:
            raise UserError(
                f"--crop-padding pads the random crop of CIFAR-sized images, and these are photos (median shorter "
                f"side {typical_side} px), trained on random-resized crops; drop --crop-padding"
            )
        args.stem = args.stem or "imagenet"
        args.input_size = args.input_size or data.PHOTO_INPUT_SIZE
        args.image_size = round(args.input_size * data.STORED_SCALE)
        args.eval_crop, args.train_crop = args.input_size, "random-resized"
        mean, std = data.IMAGENET_MEAN, data.IMAGENET_STD
    else:
        args.stem = args.stem or recipe["stem"]
        upsampled_side = recipe["upsampled_side"] if args.stem == "imagenet" else None
        args.input_size = args.input_size or max(small, upsampled_side or small)
        args.image_size = args.eval_crop = small
        args.train_crop = "padded"
        mean, std = data.CIFAR10_MEAN, data.CIFAR10_STD
    args.mean, args.std = tuple(args.mean or mean), tuple(args.std or std)
    args.crop_padding = recipe["crop_padding"] if args.crop_padding is None else args.crop_padding
    grows = not photos and args.input_size > args.image_size
    if args.small_epochs is None:  # the recipe's share, where there is a larger input to grow to
        args.small_epochs = int(args.epochs * recipe["small_share"]) if grows else 0
    if args.small_epochs and not grows:
        raise UserError(
            f"--small-epochs trains CIFAR-sized images at their stored size before they are upsampled to --input-size, "
            f"and {'these are photos' if photos else f'--input-size is {args.input_size}'}; drop --small-epochs"
            f"{'' if photos else ', or pass a larger --input-size'}"
        )
    check_patience(args)
    if photos:
        return f"median shorter side {typical_side} px, above {data.SMALL_SIDE}: photos"
    if small > data.IMAGE_SIZE:
        return f"median shorter side {typical_side} px, at most {data.SMALL_SIDE}: small images, kept at their size"
    return f"median shorter side {typical_side} px: CIFAR-sized, kept at {data.IMAGE_SIZE}x{data.IMAGE_SIZE}"


def describe_sizes(args, size=None):
    """The preprocessing, in words: the log line, and the checkpoint's record of it (size: the input side
    of its epoch, when --small-epochs made it another)."""
    stored = f"shorter side resized to {args.image_size}, centre {args.image_size}x{args.image_size} kept"
    if args.train_crop == "padded":
        train = f"random crop with padding {args.crop_padding}, flip"
        evaluation = "the whole image"
    else:
        (low, high), (narrow, wide) = data.CROP_AREA, data.CROP_RATIO
        train = f"random-resized crop (area {low:.0%}-{high:.0%}, aspect ratio {narrow:.2f}-{wide:.2f}), flip"
        evaluation = f"the centre {args.eval_crop}x{args.eval_crop}"
    size = size or args.input_size
    network = f"at {size}x{size}"
    return f"stored: {stored}; training: {train}, {network}; evaluation: {evaluation}, {network}"


RESUME_MAY_CHANGE = ("epochs", "data_dir", "cache_dir", "data_on", "compile", "log_with")  # the rest: the run's own


def resumed_settings(args, progress):
    """The run's own settings, but those of RESUME_MAY_CHANGE given (--data-dir: the same data, moved,
    checked against its fingerprint). Any other flag given must equal the run's value, so the command
    that started the run, with --resume added, continues it. Settings newer than the run: defaults."""
    saved = progress["config"]
    defaults = vars(parse_args(["--recipe", saved["recipe"]]))  # the saved settings override these
    # where its data comes from and how it runs: the run's own, unless given anew (the printed resume
    # command names neither, and the run's cache is not the default one when it had a --cache-dir)
    machinery = {key: args.given.get(key, saved.get(key, getattr(args, key))) for key in ("cache_dir", "data_on")}
    # how it runs: this command's (--compile is on or off as typed; the launch has made its trackers)
    machinery |= dict(compile=args.compile, log_with=args.log_with, output_dir=args.output_dir, resume=True)
    # what runs from before these settings existed did: no fingerprint, CIFAR-sized images at 32x32
    older = dict(data_fingerprint=None, train_crop="padded", arch="resnet18", optimizer="SGD", small_epochs=0)
    older |= dict(class_weights_digest=None)
    older |= dict.fromkeys(("input_size", "image_size", "eval_crop"), data.IMAGE_SIZE)
    config = defaults | older | saved | machinery
    changed = [
        f"{flag_of(key)} {value} (the run's: {'not set' if config[key] is None else config[key]})"
        for key, value in args.given.items()
        if key not in (*RESUME_MAY_CHANGE, "resume", "output_dir") and not same_setting(key, value, config)
    ]
    if changed:
        raise UserError(
            f"--resume continues the run with its own settings, and {'; '.join(changed)} differ; "
            f"drop them, or start again with --overwrite"
        )
    for key in ("epochs", "data_dir"):
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    if args.data_dir is None and not Path(config["data_dir"]).exists():
        raise UserError(
            f"the run's data folder {config['data_dir']} does not exist any more (moved?); resume with "
            f"--data-dir and its new place"
        )
    return argparse.Namespace(**config | {"mean": tuple(config["mean"]), "std": tuple(config["std"])})


def same_setting(key, given, config):
    """A flag given on --resume against the run's value: the same meaning written another way is the same
    (class weights, which are scaled to mean 1: 1,2 and 0.5,1; the run's file at a new place, the same bytes;
    targeted classes in another order)."""
    saved = config[key]
    if key == "class_weights" and config["class_weights_digest"] and Path(given).is_file():
        return given == saved or data.file_digest(given) == config["class_weights_digest"]
    if key == "class_weights" and weight_list(given) and weight_list(saved):
        given, saved = (torch.tensor(weight_list(spec), dtype=torch.double) for spec in (given, saved))
        return len(given) == len(saved) and torch.allclose(given / given.sum(), saved / saved.sum())
    if key == "targeted_augment":
        return sorted(given.split(",")) == sorted(saved.split(","))
    return given == saved


def weight_list(spec):
    """--class-weights w0,w1,...: the numbers, or None when spec is not a list of numbers."""
    try:
        return [float(w) for w in spec.split(",")]
    except ValueError:
        return None


def class_weights(spec, train_labels, classes):
    """Cross-entropy weight per class, scaled to mean 1 (see --class-weights), or None. From a run,
    in proportion to its per-class error, never below RUN_WEIGHT_FLOOR of the mean error: a class
    the run got all right would otherwise weigh 0 and never be learnt."""
    num_classes = len(classes)
    check_class_weights(spec)
    if spec == "none":
        return None
    if spec == "auto":
        weights = 1 / torch.bincount(train_labels, minlength=num_classes).clamp(min=1).double()
    elif Path(spec).is_file():
        errors = 1 - torch.tensor(per_class_accuracy_of_run(Path(spec), classes), dtype=torch.double)
        weights = errors.clamp(min=RUN_WEIGHT_FLOOR * errors.mean().item()) if errors.any() else torch.ones(num_classes)
    else:
        weights = torch.tensor(weight_list(spec), dtype=torch.double)
    if len(weights) != num_classes or not (weights.isfinite() & (weights >= 0)).all() or weights.sum() <= 0:
        raise UserError(
            f"--class-weights needs {num_classes} finite, non-negative weights, not all 0; got {weights.tolist()}"
        )
    weights = weights / weights.max()  # first: the sum of weights near 1e308 would overflow
    return (weights * num_classes / weights.sum()).float()


def check_class_weights(spec):
    """Refuse a --class-weights that is no word, list of numbers or file; parse_args asks, before the data."""
    if spec not in ("none", "auto") and weight_list(spec) is None and not Path(spec).is_file():
        not_a_folder(spec, "--class-weights ")
        raise UserError(f"--class-weights {spec!r} is not none, auto, a file or a list of numbers")


def per_class_accuracy_of_run(path, classes):
    """Per-class validation accuracy at a previous run's lowest validation loss, from its checkpoint
    or its history.json (whose class names come from the checkpoint beside it); the run's classes
    must be these."""
    beside = [path.with_name(name) for name in ("best.safetensors", "last.safetensors")]
    checkpoint = path if path.suffix == ".safetensors" else next((p for p in beside if p.is_file()), beside[0])
    try:
        with safe_open(checkpoint, framework="pt") as file:
            metadata = decode_metadata(file.metadata())
        run_classes = metadata["classes"]
        if path.suffix == ".safetensors":
            accuracy = metadata["val_per_class"]
        else:
            records = json.loads(path.read_text())
            if not isinstance(records, list) or not all(isinstance(r, dict) and "val_loss" in r for r in records):
                raise ValueError("not a list of epochs with their val_loss")
            accuracy = best_record(records)["val_per_class"]  # the epoch best.safetensors holds
        if len(accuracy) != len(run_classes):
            raise ValueError(f"{len(accuracy)} per-class accuracies for {len(run_classes)} classes")
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as error:
        reason = f"no {error}" if isinstance(error, KeyError) else error
        raise UserError(
            f"--class-weights {path}: no per-class validation accuracy with class names ({reason}); "
            f"pass a run's best.safetensors, or its history.json with best.safetensors beside it"
        ) from error
    if run_classes != classes:
        raise UserError(f"--class-weights {path}: that run's classes {run_classes} are not these {classes}")
    return accuracy


def two_stage_groups(classes):
    groups = data.group_of_classes(classes)
    if groups is None:
        raise UserError(f"--two-stage needs data.GROUPS to name each of {classes} once; edit GROUPS in data.py")
    return list(groups.values())


def training_controls(args):
    controls = [
        f"head only for {args.freeze_epochs} epoch(s)" if args.freeze_epochs else "",
        f"the first {args.small_epochs} epoch(s) at {args.image_size}x{args.image_size}" if args.small_epochs else "",
        f"backbone lr x{args.backbone_lr_mult}" if args.backbone_lr_mult != 1 else "",
        f"gradient norm clipped to {args.clip_grad_norm}" if args.clip_grad_norm else "",
        f"mixup {args.mixup}" if args.mixup else "",
        f"CutMix {args.cutmix}" if args.cutmix else "",
        f"{args.auto_augment} policy" if args.auto_augment != "none" else "",
        f"targeted augmentation for {args.targeted_augment}" if args.targeted_augment != "none" else "",
        f"EMA {args.ema}" if args.ema else "",
        "two-stage head" if args.two_stage else "",
    ]
    return "".join(f", {control}" for control in controls if control)


def effective_batch(args, accelerator):
    return args.batch_size * accelerator.num_processes * args.grad_accum_steps


# ---------------------------------------------------------------------------------- the data


def load_data(args, accelerator):
    """The training and validation loaders, on the training device, the training labels and the class
    names. A new run's sizes follow the images (data_settings); a resumed run's are its own."""
    data.LOG = accelerator.print  # data.py's lines: once a machine, not once a process

    def check(found, counts):  # before decoding: too few images for a step, or other data, is refused
        check_batch(args, counts["train"], accelerator)
        check_data(args, found, accelerator)

    with main_process_first(accelerator):  # one process downloads, the others then read
        started = time.perf_counter()
        listing = data.list_images(args.data_dir, "train")
        rule = data_settings(args, data.typical_side(listing[0])) if not args.resume else "the run's"
        stem_factor = 16 if args.stem == "cifar" else 1
        activations = args.batch_size * args.input_size**2 * ACTIVATION_BYTES_PER_PIXEL * stem_factor
        splits, classes, _, val_source = data.load_split(
            args.data_dir,
            args.image_size,
            args.val_fraction,
            args.seed,
            args.max_train_samples,
            accelerator.device,
            reserved=activations,
            listing=listing,
            cache_dir=data.cache_location(args.cache_dir),
            data_on=args.data_on,
            check=check,
        )
    train_split, val_split = (splits[part].to(accelerator.device) for part in ("train", "val"))
    train_labels, val_labels = train_split.labels, val_split.labels
    check_batch(args, len(train_labels), accelerator)  # again: unreadable images were skipped
    held = "read batch by batch from the cache on disk" if train_split.rows is not None else "held in memory"
    accelerator.print(
        f"data: {len(train_labels)} train / {len(val_labels)} val images, {len(classes)} classes, "
        f"from {args.data_dir}, loaded in {time.perf_counter() - started:.1f}s, {held}\n"
        f"validation: {val_source}\nsizes ({rule}): {describe_sizes(args)}"
    )
    # The last partial batch is dropped (a batch of one image breaks BatchNorm); each epoch's new
    # order puts other images there, so every image is still trained on.
    train_loader = data.make_loader(train_split, args.batch_size * args.grad_accum_steps, True, drop_last=True)
    # photos are validated in training-sized batches: 1024 at 224x224 would hold gigabytes of activations
    val_batch = VAL_BATCH_SIZE if args.train_crop == "padded" else args.batch_size
    val_loader = data.make_loader(val_split, val_batch, shuffle=False)
    return train_loader, val_loader, train_labels, classes


def check_batch(args, count, accelerator):
    """Every process needs full batches a step."""
    global_batch = effective_batch(args, accelerator)
    if count < global_batch:
        processes = f" x {accelerator.num_processes} processes" if accelerator.num_processes > 1 else ""
        accumulated = f" x --grad-accum-steps {args.grad_accum_steps}" if args.grad_accum_steps > 1 else ""
        raise UserError(
            f"--batch-size {args.batch_size}{processes}{accumulated} needs {global_batch} training images a step, "
            f"and there are {count}; lower --batch-size{' or the process count' if processes else ''}"
            f"{' or --grad-accum-steps' if accumulated else ''}"
        )


def check_data(args, found, accelerator):
    """The split is made from the data, so a resumed run must find the same data; a new run records
    it (args.data_fingerprint, saved in the state and the checkpoints; evaluate.py checks it too)."""
    if args.resume and args.data_fingerprint is None:
        accelerator.print(
            f"warning: this run predates data fingerprints; cannot check that {args.data_dir} is its data"
        )
    elif args.resume:
        difference = data.data_difference(args.data_fingerprint, found)
        if difference:
            raise UserError(
                f"{args.data_dir} is not the data this run was split from ({difference}); resume with the run's "
                f"own data (restore its images, or pass --data-dir DIR where they are), or start "
                f"{new_run_from(args.output_dir)}"
            )
        accelerator.print(f"data: {args.data_dir} holds the run's data (fingerprint {found['sha256']})")
    args.data_fingerprint = found


# ---------------------------------------------------------------------------------- checkpoints, calibration


def checkpoint_metadata(args, classes, groups, accelerator, record):
    """What the checkpoint holds, enough to rebuild and evaluate it with nothing else (README)."""
    keys = "arch stem mean std image_size eval_crop train_crop seed val_fraction".split()
    size = record["input_size"]  # --small-epochs: the size this epoch trained and was validated at
    settings = {key: getattr(args, key) for key in keys} | dict(input_size=size)
    settings["preprocessing"] = describe_sizes(args, size)
    scores = {key: record[key] for key in ("epoch", "val_loss", "val_acc", "val_per_class")}
    run = dict(groups=groups, num_classes=len(classes), classes=classes, num_processes=accelerator.num_processes)
    return settings | scores | run | dict(effective_batch_size=effective_batch(args, accelerator), config=vars(args))


def sync_batchnorm_statistics(network, accelerator):
    """Each process updates its own BatchNorm running statistics; use the main process's, the
    ones that are saved, everywhere, so validation measures the checkpoint."""
    if accelerator.num_processes > 1:
        for buffer in accelerator.unwrap_model(network).buffers():
            torch.distributed.broadcast(buffer, src=0)


def calibrate(logits, labels):
    """The temperature fitted on the validation split's logits, with that split's NLL and ECE before
    and after: saved in the checkpoint, for evaluate.py's calibrated probabilities."""
    temperature = fit_temperature(logits, labels)
    before, after = calibration(logits, labels), calibration(logits, labels, temperature)
    return dict(
        temperature=temperature,
        calibration=dict(
            fitted_on=f"the run's validation split, {len(labels)} images",
            images=len(labels),
            val_nll=[before["nll"], after["nll"]],
            val_ece=[before["ece"], after["ece"]],
        ),
    )


def final_summary(out, args, history, classes):
    """The best epoch, the run's files as they are (a resumed run may have lost its best.safetensors,
    and rewrites it only when an epoch improves on it), and the command that evaluates it."""
    best = best_record(history)
    folder = Path(args.data_dir)
    test = folder / "test"  # evaluated by default when it holds the run's classes, else the run's own split
    tested = test.is_dir() and data.class_folders(test) == classes
    split = " --split val" if (folder / "train").is_dir() and not tested else ""
    lines = [f"best: epoch {best['epoch']}, val loss {best['val_loss']:.4f}, val acc {best['val_acc']:.2%}"]
    if best["epoch"] <= args.freeze_epochs:  # said: the whole network trained, and did not do better
        lines[0] += f", of the head alone (--freeze-epochs {args.freeze_epochs}; no later epoch had a lower loss)"
    checkpoint = out / "best.safetensors"
    if checkpoint.is_file():
        lines.append(f"files: {out}/best.safetensors (epoch {best['epoch']}), last.safetensors, history.json")
        lines += calibration_summary(checkpoint)
    else:
        lines.append(
            f"warning: {checkpoint} is missing (removed?), and no epoch since epoch {best['epoch']} had a lower "
            f"validation loss to write it again; {out}/last.safetensors holds epoch {history[-1]['epoch']}"
        )
        checkpoint = out / "last.safetensors"
    cache = ["--cache-dir", args.cache_dir] if args.cache_dir else []  # the run's, not the default one
    command = shlex.join(
        ["python", beside("evaluate.py"), data.absolute(checkpoint), "--data-dir", args.data_dir, *cache]
    )
    return "\n".join(lines + [f"evaluate: {command}{split}"])


def calibration_summary(checkpoint):
    """The temperature the checkpoint holds, and what it did on the validation split; [] if none."""
    with safe_open(checkpoint, framework="pt") as file:
        metadata = decode_metadata(file.metadata())
    if "temperature" not in metadata:
        return []
    fitted = metadata["calibration"]
    (nll_before, nll_after), (ece_before, ece_after) = fitted["val_nll"], fitted["val_ece"]
    line = (
        f"calibration: T = {metadata['temperature']:.3f}, fitted on {fitted['fitted_on']} (NLL {nll_before:.4f} -> "
        f"{nll_after:.4f}, ECE {ece_before:.4f} -> {ece_after:.4f}); evaluate.py divides the logits by it"
    )
    return [line] + ([caveat] if (caveat := calibration_caveat(metadata)) else [])


# ---------------------------------------------------------------------------------- the lr range test
# --find-lr: Smith's learning-rate range test ("Cyclical learning rates", 2017), as fastai's lr_find.

FIND_LR_RANGE = (1e-7, 10.0)  # fastai's: the lr rises exponentially from the first to the second
FIND_LR_STEPS = 100
FIND_LR_SMOOTHING = 0.98  # the loss's exponential moving average, debiased, as fastai's and Lightning's
FIND_LR_DIVERGED = 4  # stop once the smoothed loss is 4x its lowest (fastai)


def find_lr(args, accelerator):
    """From the run's starting weights, FIND_LR_STEPS steps on the training split as epoch 1 trains
    (its augmentation; only the head with --freeze-epochs), the lr rising exponentially across
    FIND_LR_RANGE, stopped when the loss diverges. Prints the suggested peak lr, a tenth of the lr at
    the smoothed loss's minimum, and plots loss against lr to lr_find.png in --output-dir (default:
    here). Nothing else is written: the trained weights are thrown away."""
    plot = Path(args.output_dir or ".") / "lr_find.png"
    check_folder_can_be_made(plot.parent, "--output-dir", args.output_dir or ".")
    if plot.is_dir() or (plot.exists() and not drawn_here(plot)):
        raise UserError(f"{plot} is not a plot of train.py --find-lr, and the plot would replace it; move it, or "
                        f"pass another --output-dir")  # fmt: skip
    low, high = FIND_LR_RANGE
    lr_now = "the --lr given is" if args.lr else "without --lr this run would use"  # the recipe's is set later

    def lr_at(step):
        return low * (high / low) ** (min(step, FIND_LR_STEPS - 1) / (FIND_LR_STEPS - 1))

    # the head's lr (the backbone's is x --backbone-lr-mult); accelerate steps the scheduler once a process
    run = prepare_training(args, None, accelerator, lambda step: lr_at(step // accelerator.num_processes) / args.lr)
    training_mode(run, args, 1, accelerator)
    generator = torch.Generator(accelerator.device).manual_seed(args.seed)
    lrs, losses, smoothed, average = [], [], [], 0.0
    bar = tqdm(total=FIND_LR_STEPS, desc="lr range test", leave=False, disable=not accelerator.is_local_main_process)
    for step, (images, labels) in zip(range(FIND_LR_STEPS), batches_forever(run.train_loader)):
        loss = train_step(run, accelerator, args, images, labels, generator)[0]
        value = accelerator.reduce(loss, "mean").item()  # read each step, to stop at the divergence
        average = FIND_LR_SMOOTHING * average + (1 - FIND_LR_SMOOTHING) * value
        lrs.append(lr_at(step))
        losses.append(value)
        smoothed.append(average / (1 - FIND_LR_SMOOTHING ** (step + 1)))
        bar.update()
        if not math.isfinite(smoothed[-1]) or smoothed[-1] > FIND_LR_DIVERGED * min(smoothed):
            break
    bar.close()
    finite = [i for i, value in enumerate(smoothed) if math.isfinite(value)]
    if not finite:
        raise UserError(
            f"the loss is {losses[0]} at the range test's first step, at lr {low:g}: the network's output is not "
            f"finite from the start; check --weights"
        )
    if accelerator.is_main_process:
        lowest = min(finite, key=smoothed.__getitem__)
        suggestion = lrs[lowest] / 10
        replaced = " (replaced)" if plot.exists() else ""
        with writing(plot, "--output-dir"):
            plot.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(plot, lambda temporary: plot_lr_find(temporary, lrs, losses, smoothed, suggestion, args))
        ended = "stopped: the loss diverged" if len(lrs) < FIND_LR_STEPS else "no divergence"
        accelerator.print(
            f"lr range test: {len(lrs)} steps of {effective_batch(args, accelerator)} images, lr {low:g} to "
            f"{lrs[-1]:.3g} ({ended}); the smoothed loss is lowest, {smoothed[lowest]:.3f}, at lr {lrs[lowest]:.3g}\n"
            f"suggested peak lr: {suggestion:.3g} (rule: a tenth of the lr at the lowest smoothed loss, fastai's); "
            f"pass it as --lr ({lr_now} {args.lr:g})\nplot: {plot}{replaced}"
        )
    accelerator.end_training()


def batches_forever(loader):
    for epoch in itertools.count(1):
        loader.set_epoch(epoch)
        yield from loader


def plot_lr_find(path, lrs, losses, smoothed, suggestion, args):
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 5), layout="constrained")
    axes.plot(lrs, losses, color="0.7", linewidth=1, label="loss of the step")
    axes.plot(lrs, smoothed, color="C0", linewidth=2, label=f"smoothed (moving average, {FIND_LR_SMOOTHING})")
    finite = [value for value in smoothed if math.isfinite(value)]
    axes.plot(10 * suggestion, min(finite), "o", color="C3", label=f"lowest smoothed loss, lr {10 * suggestion:.3g}")
    axes.axvline(suggestion, color="C3", linestyle="--", label=f"suggested peak lr {suggestion:.3g} (a tenth)")
    top = max(min(max(finite), 1.3 * finite[0]), 1.1 * min(finite))  # the descent, not the divergence's heights
    axes.set_ylim(0.9 * min(finite), top)
    backbone = f", backbone lr x{args.backbone_lr_mult:g}" if args.backbone_lr_mult != 1 else ""
    axes.set(xscale="log", xlabel=f"learning rate (the head's{backbone})", ylabel="training loss")
    weights = args.weights if args.weights in ("imagenet", "none") else "/".join(Path(args.weights).parts[-2:])
    axes.set_title(f"lr range test: {Path(args.data_dir).name}, weights {weights}", fontsize=10)
    figure.legend(loc="outside lower center", ncols=2, fontsize=9)  # beside the curves, not over them
    figure.savefig(path, format="png", dpi=120, metadata={"Source": f"train.py --find-lr on {args.data_dir}"})
    plt.close(figure)


# ---------------------------------------------------------------------------------- the run folder
# train.py's --output-dir: the checkpoints, history.json, the trackers' files and accelerate's
# resumable state. Written so that a crash at any point leaves a run that resumes, and locked so
# that two runs never share it.

TRACKER_PROJECT = "resnet18-cifar10"  # accelerate's project name: the tracker's project; TensorBoard's subfolder
RUN_FILES = ("history.json", "best.safetensors", "last.safetensors", TRACKER_PROJECT)
TRACKER_FILES = re.compile(r"events\.out\..+|hparams\.yml")
# the names evaluate.py gives its plots of the run's checkpoints (evaluation_plots, sheet_names): --overwrite
# removes them with the run they showed; a copy of yours under another name stays
EVALUATION_PLOTS = re.compile(
    rf"curves\.png|(best|last)_((test|val)(_tta)?_({'|'.join(PLOT_KINDS)})|predictions(_\d+)?)\.png"
)
# what a state folder holds: accelerate's files (see accelerate.utils.constants), our progress.json, and
# write_atomically's temporaries, and safetensors' own (0.8 writes model.safetensors through .tmpXXXXXX: a kill -9
# there left one, and the resume refused the run). A file or folder of a run's names that is not the run's is not
# ours to remove.
STATE_FILES = re.compile(
    r"(progress\.json|(pytorch_)?model(_\d+)?\.(safetensors|bin)|(optimizer|scheduler|sampler|dl_state_dict)(_\d+)?"
    r"\.bin|(random_states|custom_checkpoint)_\d+\.pkl|scaler\.pt)(\.tmp-\d+)?|\.tmp[0-9A-Za-z]{6}"
)


def read_progress(out):
    """The settings and history saved with the run's newest state, refused in one line when damaged."""
    path = data.latest_state(out) / "progress.json"
    try:
        progress = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UserError(damaged_state(out, path, error)) from error
    if not isinstance(progress, dict) or not {"config", "history"} <= set(progress):
        raise UserError(damaged_state(out, path, "no config and history"))
    return progress


def damaged_state(out, path, error):
    """The line for a state that would not load: unreadable (a permission: the run is whole), or damaged."""
    if isinstance(error, PermissionError):
        return f"cannot read {error.filename or path} ({error.strerror}); make it readable, then resume"
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return (
        f"{path} is damaged ({reason}), so {out} cannot be resumed; start {new_run_from(out)}, or this one again "
        f"with --overwrite"
    )


def new_run_from(out):
    """A new run from the run's weights where it saved them (none before its first epoch ended)."""
    last = Path(out) / "last.safetensors"
    return f"a new run from its weights (--weights {shlex.quote(str(last))})" if last.is_file() else "a new run"


def check_output_dir(out, resume, overwrite):
    """Refuse, before any work: a file in the way, nothing to resume, or a run not to be touched."""
    check_folder_can_be_made(out, "--output-dir", out)
    foreign = [name for name in (*RUN_FILES, *data.STATE_DIRS) if (out / name).exists() and not of_a_run(out / name)]
    if foreign:
        raise UserError(f"{out / foreign[0]} was not written by train.py or is damaged, and a run would replace it; "
                        f"move it, or pass another --output-dir")  # fmt: skip
    if resume and not data.latest_state(out):
        if (out / "state").is_dir():  # its progress.json lost
            raise UserError(damaged_state(out, out / "state" / "progress.json", "missing"))
        raise UserError(f"nothing to resume in {out}; start a new run without --resume")
    finished = any((out / name).exists() for name in RUN_FILES) or data.latest_state(out)
    if finished and not (resume or overwrite):
        raise UserError(
            f"{out} already holds a run; pass --resume to continue it, --overwrite to replace it, "
            f"or another --output-dir"
        )


def of_a_run(path):
    """Whether a file or folder of a run's names (RUN_FILES, data.STATE_DIRS) is what train.py writes there."""
    try:
        if path.name == TRACKER_PROJECT:  # TensorBoard's event files, and the hparams.yml accelerate 1.16 writes
            return path.is_dir() and all(TRACKER_FILES.fullmatch(f.name) for f in path.rglob("*") if f.is_file())
        if path.name == "history.json":
            return all({"epoch", "val_loss"} <= set(record) for record in json.loads(path.read_text()))
        if path.suffix == ".safetensors":
            with safe_open(path, framework="pt") as file:
                return "classes" in (file.metadata() or {})
        return path.is_dir() and all(STATE_FILES.fullmatch(file.name) for file in path.iterdir())
    except (OSError, ValueError, TypeError, SafetensorError):
        return False


def shows_run(plot, out):
    """Whether a plot of evaluate.py shows the run in out: its recorded source names out's checkpoints or
    history (a plot of another run, copied here to compare, is not)."""
    source = f"{png_source(plot) or ''} "
    return source.startswith("evaluate.py") and any(f"{out.resolve() / name} " in source for name in RUN_FILES[:3])


def new_run_dir():
    """runs/<timestamp>, made here; -2, -3, ... for runs started in the same second (mkdir is atomic,
    so two runs never share a folder)."""
    stamp = f"runs/{datetime.now():%Y-%m-%d_%H-%M-%S}"
    for out in itertools.chain([Path(stamp)], (Path(f"{stamp}-{n}") for n in itertools.count(2))):
        try:
            out.mkdir(parents=True)
            return out
        except FileExistsError:
            pass


def lock(out):
    """Hold out/.lock for as long as this process lives; the system lets go of it when the process
    ends, crashed or not, so a second run in the same folder is refused and a crash never jams it."""
    handle = data.lock_file(out / ".lock", wait=False)
    if handle is None:
        raise UserError(f"another train.py is running in {out}; wait for it or pass another --output-dir")
    return handle


def start_output_dir(out, resume, overwrite, accelerator):
    """Create, lock and prepare the run's folder once the inputs have proved good; returns (folder,
    lock). The main process does it; a refusal reaches the others too, which then end quietly (main)."""
    found, held = [None], None
    if accelerator.is_main_process:
        try:
            out, held = prepare_output_dir(out, resume, overwrite)
            found = [str(out)]
        except UserError as error:
            found = [error]
    broadcast_object_list(found)
    accelerator.wait_for_everyone()  # the send done before anyone exits: without, rank 0 aborted in 6 of 24
    if isinstance(found[0], UserError):
        raise found[0]
    return Path(found[0]), held


def prepare_output_dir(out, resume, overwrite):
    """start_output_dir's work: (folder, lock). Checked again under the lock: another run may have
    started here meanwhile."""
    try:
        out = out or new_run_dir()
        out.mkdir(parents=True, exist_ok=True)
        held = lock(out)
        check_output_dir(out, resume, overwrite)
        newest = data.latest_state(out)
        if resume and newest.name != "state":  # a crash stopped save_state halfway: finish it
            discard(out / "state")
            newest.rename(out / "state")
        if resume:
            leftovers = [n for n in data.STATE_DIRS if n != "state"]
        else:  # --overwrite, or a new folder
            plots = [path.name for path in out.iterdir() if EVALUATION_PLOTS.fullmatch(path.name)]
            plots = [name for name in plots if shows_run(out / name, out)]
            leftovers = [*RUN_FILES, *data.STATE_DIRS, *plots]
            if plots:  # yours, and evaluate.py's of other runs, stay
                print(f"removed {', '.join(sorted(plots))}: evaluate.py's plots of the run in {out} before")
        for name in leftovers:
            discard(out / name)
        kept = sorted(path.name for path in out.iterdir() if path.name != ".lock")
        if overwrite and kept:
            print(f"--overwrite: kept {', '.join(kept)}, not files of the run or its plots")
    except OSError as error:
        raise UserError(f"cannot write to {out or 'runs/'} ({error.strerror}); pass another --output-dir") from error
    return out, held


def discard(path):
    """Remove a file or folder. A state folder loses its progress.json first, so that one half
    removed by a crash never looks complete."""
    if path.is_dir():
        (path / "progress.json").unlink(missing_ok=True)
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def save_state(accelerator, out, progress):
    """accelerate's save_state, made atomic: write state-tmp (progress.json last), then swap it in
    by renaming. data.latest_state finds a complete state after a crash at any point."""
    tmp, state, old = (out / name for name in data.STATE_DIRS)
    if accelerator.is_main_process:
        discard(tmp)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(tmp)
    except RuntimeError as error:  # torch.save's writer on a full disk says only "unexpected pos 949568 vs 949464"
        raise OSError(f"torch.save failed, {shutil.disk_usage(out).free / 2**20:.0f} MB free there") from error
    accelerator.wait_for_everyone()  # every rank's random_states_N.pkl is in before the rename
    if accelerator.is_main_process:
        for file in tmp.iterdir():
            usual_permissions(file)
        write_json(tmp / "progress.json", progress)
        discard(old)
        if state.exists():
            state.rename(old)
        tmp.rename(state)
        discard(old)
    accelerator.wait_for_everyone()


def write_json(path, obj):
    write_atomically(path, lambda temporary: temporary.write_text(json.dumps(obj, indent=1)))


def resume_command(out, accelerator, processes=None, flags=()):
    """The command that continues this run, with the launcher settings it ran with (processes: that many
    instead of this launch's) and flags (given_anew), quoted for a shell."""
    launch = ["accelerate", "launch"]
    processes = processes or accelerator.num_processes
    if processes > 1:
        launch += ["--multi_gpu", "--num_processes", str(processes)]
    if accelerator.mixed_precision != "no":
        launch += ["--mixed_precision", accelerator.mixed_precision]
    return shlex.join([*launch, beside("train.py"), "--output-dir", data.absolute(out), "--resume", *flags])


def beside(script):
    """A script of ours as a path from the working folder, so that a printed command runs where this one did;
    absolute from outside the scripts' folder (not ../../scripts/train.py)."""
    path = data.absolute(Path(__file__).with_name(script))  # not python w1/../clone/train.py's spelling
    try:
        relative = os.path.relpath(path)
    except ValueError:  # Windows: the working folder is on another drive
        return path
    return path if relative.startswith("..") else relative


def given_anew(args, progress):
    """This command's RESUME_MAY_CHANGE for the resume command it prints, as words: --epochs and where the data
    comes from, which the state learns only at the end of an epoch, and how it runs (--compile, --log-with),
    which each command gives anew."""
    saved = progress["config"] if progress else vars(args)
    words = []
    for key in RESUME_MAY_CHANGE:
        value = getattr(args, key)
        if value in (None, False) or (key not in ("compile", "log_with") and value == saved.get(key)):
            continue
        words += [flag_of(key)] + ([] if value is True else [str(value)])
    return words


def open_run(args, accelerator):
    """The run's folder, checked before any work, and a resumed run's saved progress and settings:
    (args, folder or None for runs/<timestamp>, progress or None for a new run); (None, ...) when a
    resumed run has nothing left to train."""
    out = Path(args.output_dir) if args.output_dir else None
    if out is None:
        return args, None, None
    if accelerator.is_main_process and (out / ".lock").is_file():
        lock(out).close()  # another run busy here: say so now, not after loading the data
    check_output_dir(out, args.resume, args.overwrite)
    if not args.resume:
        return args, out, None
    progress = read_progress(out)
    args = resumed_settings(args, progress)
    if progress["config"].get("log_with") and not args.log_with:
        accelerator.print(f"warning: the run logged to {progress['config']['log_with']}; this part of it logs to no "
                          f"tracker unless you pass --log-with {progress['config']['log_with']}")  # fmt: skip
    check_resumable(out, args, progress, accelerator)
    finished = finished_run(args, progress["history"], progress["config"]["epochs"])
    if finished:
        accelerator.print(f"{out}: {finished}")
        accelerator.end_training()  # with several processes, also leaves their group cleanly
        return None, out, progress
    say_process_count(out, args, progress, accelerator)
    return args, out, progress


def check_resumable(out, args, progress, accelerator):
    """Refuse a resume under another ARCH, or with too few epochs."""
    done = len(progress["history"])
    if args.arch != model.ARCH:
        raise UserError(
            f"{out} is a {args.arch} run, and model.ARCH is now {model.ARCH}: its state would not fit. Set ARCH back "
            f"to {args.arch!r} to resume it, or start a new run"
        )
    if args.epochs < done:
        raise UserError(f"{out} has already trained {done} epochs; pass a larger --epochs")
    if args.epochs > done == progress["config"]["epochs"] and progress["history"][-1].get("lr") == 0:
        raise lr_at_zero(args)  # said before any image is read; extend_schedule computes it for older histories
    limits = [("--freeze-epochs", args.freeze_epochs, args.epochs - 1, "the whole network trains"),
              ("--small-epochs", args.small_epochs, args.epochs - 1, "it trains at --input-size"),
              ("--warmup-epochs", args.warmup_epochs, args.epochs, "its lr reaches its peak")]  # fmt: skip
    for flag, value, most, until in limits:
        if value > most:
            raise UserError(f"the run has {flag} {value:g}, and --epochs {args.epochs} would end it before {until}; "
                            f"pass a larger --epochs")  # fmt: skip
    if done < args.epochs != progress["config"]["epochs"]:  # fewer than planned may leave --patience nothing to do
        check_patience(args, resumed=True)  # (none left to train: finished_run says so)


def say_process_count(out, args, progress, accelerator):
    """Warn when another process count changes the global batch (the schedule counts images, so the lr at
    each point stays as planned)."""
    had = len(list(data.latest_state(out).glob("random_states_*.pkl")))  # accelerate saves one per process
    now = accelerator.num_processes
    if had and had != now:
        per_process = args.batch_size * args.grad_accum_steps
        accelerator.print(
            f"warning: {out} was trained by {had} process(es), a global batch of {had * per_process}; it goes on "
            f"with {now}, a global batch of {now * per_process} ({per_process} per process, the same learning "
            f"rate schedule per image), so it will not match a run with {had}. For that: "
            f"{resume_command(out, accelerator, had, given_anew(args, progress))}"
        )


def same_optimizer(args, progress, optimizer):
    """The optimizer's class is recorded with the run (args.optimizer); a resumed run's saved state
    fits only the class that made it (SGD's has no AdamW 'step': a KeyError deep in load_state)."""
    built = type(optimizer).__name__
    if progress and args.optimizer != built:
        raise UserError(
            f"{args.output_dir} was trained with {args.optimizer}, and build_training now makes {built}: its saved "
            f"state fits only {args.optimizer}. Resume under the code that started it, or start a new run"
        )
    args.optimizer = built


def finished_run(args, history, saved_epochs):
    """Why a resumed run has nothing left to train, in words; None when it has. A run that --patience
    stopped is finished unless --epochs asks for more than it was planned for."""
    if patience_ran_out(args, history) and args.epochs <= saved_epochs:
        return (
            f"finished: --patience {args.patience} stopped it after epoch {len(history)} (no lower validation "
            f"loss since epoch {best_record(history)['epoch']}, which best.safetensors holds); nothing to train. "
            f"--epochs N, more than {saved_epochs}, continues it until an epoch without a lower loss stops it again"
        )
    if len(history) == args.epochs:  # an lr at 0 stays there when extended: see extend_schedule
        more = "--epochs N continues it to epoch N"
        if history[-1].get("lr") == 0:
            more = f"Its lr is 0: --weights {best_of(args)} starts a new run from its weights"
        return f"finished: all {args.epochs} epochs are trained; nothing to train. {more}"
    return None


def check_patience(args, resumed=False):
    """Refuse a --patience that could not stop the run before its last epoch (see patience_ran_out),
    naming what holds it back and only the changes that would let it stop (resumed: its --patience stays)."""
    earliest = max(args.small_epochs + 1 + (args.patience or 0), args.freeze_epochs + 1)
    if not args.patience or earliest < args.epochs:
        return
    small = f"its first {args.small_epochs} at the stored size do not count" if args.small_epochs else ""
    head_only = 0 < args.freeze_epochs >= args.epochs - 1  # otherwise the patience decides
    frozen = f"it never stops in the first {args.freeze_epochs}, the head's alone" if head_only else ""
    held = "; ".join(reason for reason in (small, frozen) if reason)
    smaller = not resumed and args.patience > 1 and max(args.small_epochs + 2, args.freeze_epochs + 1) < args.epochs
    changes = f"{'a smaller --patience, ' if smaller else ''}more --epochs{'' if resumed else ', or no --patience'}"
    raise UserError(
        f"--patience {args.patience} could stop this {args.epochs}-epoch run no earlier than its last epoch"
        f"{f' ({held})' if held else ''}: it would do nothing; pass {changes}"
    )


def patience_ran_out(args, history):
    """--patience: no lower validation loss for that many epochs. Never while --freeze-epochs trains
    the head alone or --small-epochs the small images: a run ends with its whole network trained at
    --input-size, whichever way it ends."""
    if not args.patience or len(history) <= max(args.freeze_epochs, args.small_epochs):
        return False
    return len(history) - best_record(history)["epoch"] >= args.patience


def extend_schedule(args, saved_epochs, epochs_done, steps_per_epoch, warmup_steps):
    """--resume --epochs N on a run planned for another number of epochs: the learning rate goes on
    from where it stands and decays, with the same shape, over the epochs left (cosine and linear: to
    zero at the new end); it never jumps back up. Returns the log line that says so."""
    step = epochs_done * steps_per_epoch
    factor = lr_factor(step, saved_epochs * steps_per_epoch, warmup_steps, args.schedule, args.decay_start)
    if factor == 0:
        raise lr_at_zero(args)
    change = f"--epochs {args.epochs} instead of {saved_epochs}: after epoch {epochs_done} the learning rate"
    end = SCHEDULES[args.schedule](1.0)  # the factor the decay ends at: 0 for cosine and linear
    if step < warmup_steps:  # the warmup is counted in epochs and stays as it was; the decay after it is stretched
        then = f"follows the {args.schedule} schedule to {args.lr * end:.3g}"
        then = "stays there" if args.schedule == "constant" else then
        return (
            f"{change} is still warming up: it rises from {args.lr * factor:.3g} to {args.lr:.3g} at epoch "
            f"{warmup_steps / steps_per_epoch:g}, then {then} at the new end, epoch {args.epochs}"
        )
    if args.schedule == "constant":
        return f"{change} stays at {args.lr:.3g} to the new end, epoch {args.epochs}"
    args.decay_start = (step, factor)
    return (
        f"{change} goes on from {args.lr * factor:.3g} and follows the {args.schedule} schedule "
        f"to {args.lr * factor * end:.3g} at its new end, epoch {args.epochs}"
    )


def lr_at_zero(args):
    return UserError(
        f"the run's {args.schedule} schedule has brought the learning rate to 0, so more epochs would not "
        f"change it; start a new run instead (--weights {best_of(args)} starts from its weights)"
    )


def best_of(args):
    """The run's best.safetensors, quoted for a shell, for a new run from its weights."""
    return shlex.quote(str(Path(args.output_dir) / "best.safetensors"))


# ---------------------------------------------------------------------------------- console and trackers


def time_estimate(epoch_seconds, epoch, args, accelerator):
    """Said once, from the first steps, before the hours go by; None for a run of a few minutes. Within
    --small-epochs it counts those alone: the epochs at --input-size after them are slower."""
    left = args.epochs - epoch + 1
    small = max(0, args.small_epochs - epoch + 1)
    total = epoch_seconds * (small or left)
    if total < 300:
        return None
    line = f"estimate: {epoch_seconds / 60:.1f} min an epoch, {total / 3600:.1f} h for the {small or left} left"
    if small:
        line += f" at {args.image_size}x{args.image_size}; the {left - small} at {args.input_size}x{args.input_size} "
        line += "after them take longer"
    if accelerator.device.type == "cpu" and total > 3600 and args.stem == "cifar":
        line += "; on a CPU, --recipe cpu takes minutes (bench/accuracy.md)"
    return line


def trackers(name):
    """--log-with, checked: accelerate would skip a tracker whose package is missing with a debug message."""
    available = [str(tracker) for tracker in get_available_trackers()]
    if name == "all" and not available:
        raise UserError("--log-with all found no tracker installed; pip install tensorboard, or another one")
    if name not in (None, "all", *available):
        raise UserError(f"--log-with {name} needs the {name} package; pip install {name}")
    return name


def start_trackers(accelerator, out, args):
    """Trackers that write files (TensorBoard) write them into the run's folder, known only now."""
    accelerator.project_configuration.logging_dir = str(out)
    # TensorBoard's hyperparameters take numbers and strings only
    config = {
        key: value if isinstance(value, (int, float, str, bool)) else str(value) for key, value in vars(args).items()
    }
    accelerator.init_trackers(TRACKER_PROJECT, config=config)


# ---------------------------------------------------------------------------------- process plumbing


def leave_process_group():
    """Several processes refusing an input: leave their group before exiting. Left to the interpreter's
    exit, gloo's threads aborted rank 0 now and then ("terminate called", SIGABRT: once in a CI run, on a
    loaded machine, even after start_output_dir's barrier)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def let_the_first_say_it():
    """A process other than the first, refusing an input: wait for the launcher to stop it. The launcher stops
    the others as soon as one ends: ended first, it stopped the first process before its error line (a delay
    of 2 s there lost the line in 3 of 3 runs; the test of two refusing processes failed once on a loaded
    machine). The wait ends by itself where the first process did not refuse."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # stopped now, not at a next step that will not come
    time.sleep(FIRST_SAYS_IT_S)


def launcher_of_this_process():
    """(command line, environment) of the `accelerate launch` that started this process, or None
    (Linux: read from /proc). A SIGTERM to the launcher (a job scheduler's stop, a kill) ends it
    without passing the signal on, and the trainer would run on alone: so ask Linux to send us
    SIGTERM when it dies; we then stop at the next step and keep the state, as for Ctrl-C. Asked once
    the imports are done: a launcher that died during them (PARENT is gone) stops us at once."""
    launched = "ACCELERATE_MIXED_PRECISION" in os.environ  # accelerate launch sets it, whatever the precision
    if os.getppid() != PARENT:
        if launched:
            os.kill(os.getpid(), signal.SIGTERM)
        return None
    try:
        launcher = Path(f"/proc/{PARENT}")
        command = launcher.joinpath("cmdline").read_bytes().split(b"\0")
        environment = launcher.joinpath("environ").read_bytes().split(b"\0")
    except OSError:
        return None
    if not (b"accelerate" in b" ".join(command) and b"launch" in b" ".join(command)):  # also python -m
        return None
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != PARENT:  # it died between the look and the request
        os.kill(os.getpid(), signal.SIGTERM)
    return command, environment


LAUNCHER = launcher_of_this_process()


def launch_option(name):
    """The value the `accelerate launch` command gave option name (b"--num_processes"), as `name V` or
    `name=V`; None where it gave none, or no launcher started this process."""
    command = LAUNCHER[0] if LAUNCHER else []
    for part, following in zip(command, [*command[1:], b""]):
        if part == name:
            return following
        if part.startswith(name + b"="):
            return part.split(b"=", 1)[1]
    return None


@contextlib.contextmanager
def main_process_first(accelerator):
    """accelerate's main_process_first, except that a main process refusing the input still lets the
    others in: they meet the same refusal and end quietly (main), where at a barrier the main process
    had left they would print a traceback of the broken connection."""
    if not accelerator.is_main_process:
        accelerator.wait_for_everyone()
    try:
        yield
    except UserError:
        if accelerator.is_main_process:
            accelerator.wait_for_everyone()
        raise
    if accelerator.is_main_process:
        accelerator.wait_for_everyone()


def use_all_cores(accelerator):
    """`accelerate launch` on a CPU-only machine sets OMP_NUM_THREADS=1, leaving cores idle. Divide
    the cores among the local processes instead, unless the user chose a number for the launcher
    (OMP_NUM_THREADS in its environment, or --num_cpu_threads_per_process)."""
    if accelerator.device.type != "cpu" or LAUNCHER is None:
        return
    exported = any(variable.startswith(b"OMP_NUM_THREADS=") for variable in LAUNCHER[1])
    if not exported and launch_option(b"--num_cpu_threads_per_process") is None:
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local_processes))


def check_process_count(accelerator):
    """Warn when the launcher was asked for more processes than started: without --multi_gpu, `accelerate
    launch --num_processes 2 --cpu` runs one, and says nothing."""
    asked = launch_option(b"--num_processes") or b""
    if asked.isdigit() and int(asked) > accelerator.num_processes:
        accelerator.print(
            f"warning: accelerate launch --num_processes {int(asked)} started {accelerator.num_processes}; "
            f"add --multi_gpu (CPU processes too) to train with {int(asked)}"
        )


def make_accelerator(args):
    """(the Accelerator, why chosen_precision chose its precision or None); sets args.mixed_precision:
    accelerate's, or LARGE_EPOCHS_BF16 (an autocast of our own)."""
    precision, why = chosen_precision(args)
    config = run_settings(args)[0]  # a resumed run's own: the printed resume command names none of them
    accelerator = Accelerator(
        mixed_precision="no" if precision == LARGE_EPOCHS_BF16 else precision,  # None: accelerate's, as launched
        cpu=not torch.accelerator.is_available(),  # else two CPU processes train separately (DistributedType.NO)
        # non_blocking: batches read from disk go to a GPU from pinned memory without waiting (data.make_loader)
        dataloader_config=DataLoaderConfiguration(
            use_seedable_sampler=True, data_seed=config["seed"], non_blocking=True
        ),
        log_with=trackers(args.log_with),
        project_dir=".",  # a logging folder must be named now; start_trackers sets the run's
        # train_step splits each loader batch in grad_accum_steps parts: count them, not the loader's end
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=config["grad_accum_steps"], sync_with_dataloader=False
        ),
        # a frozen backbone takes no gradient, which data parallel must be told to expect
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=config["freeze_epochs"] > 0)],
    )
    use_all_cores(accelerator)
    check_process_count(accelerator)
    args.mixed_precision = precision if precision == LARGE_EPOCHS_BF16 else accelerator.mixed_precision
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise UserError(
            "--mixed_precision fp16 does not run on a CPU: accelerate would train in float32 and call it fp16; "
            "pass --mixed_precision bf16 (fast only on CPUs with AVX512-BF16 or AMX: bench/speed.md) or no"
        )
    return accelerator, why


# --recipe cpu takes bf16 autocast on CPUs with these instructions (/proc/cpuinfo's names for AVX512-BF16 and
# AMX); without them bf16 ran 0.12-0.45x float32. With them it paid 1.4x at 48x48 (issue #29), but 0.87-1.01x
# at 32x32 on an AMX Xeon (bench/speed.md), so the --small-epochs at 32x32 stay float32: LARGE_EPOCHS_BF16,
# an autocast of our own, as accelerate's would cover every epoch.
BF16_INSTRUCTIONS = {"avx512_bf16", "amx_bf16"}
LARGE_EPOCHS_BF16 = "bf16-large-epochs"
PRECISION_WORDS = {
    "no": "float32",
    "bf16": "bf16 autocast",
    "fp16": "fp16 autocast",
    LARGE_EPOCHS_BF16: "bf16 autocast after any --small-epochs",
}


def chosen_precision(args):
    """(precision, why) for the Accelerator, or (None, None): accelerate's, as launched. Unless the user chose
    one (precision_chosen): a resumed run's own, whatever its recipe, as the printed resume command names none;
    --recipe cpu on a CPU, LARGE_EPOCHS_BF16 where the CPU has BF16_INSTRUCTIONS, else "no"."""
    config, resumed = run_settings(args)  # a resumed run: its own recipe, and the precision it ran in
    if precision_chosen():
        return None, None
    if resumed and config.get("mixed_precision"):
        own = config["mixed_precision"]
        return own, f"{PRECISION_WORDS.get(own, own)}, the run's own (accelerate launch --mixed_precision to change it)"
    if config.get("recipe") != "cpu" or torch.accelerator.is_available():
        return None, None
    found = sorted(BF16_INSTRUCTIONS & cpu_flags())
    if found:
        why = f"--recipe cpu on a CPU with {', '.join(found)} (float32: accelerate launch --mixed_precision no)"
        return LARGE_EPOCHS_BF16, f"bf16 autocast, float32 in any --small-epochs: {why}"
    return "no", "float32: --recipe cpu on a CPU with neither AVX512-BF16 nor AMX, where bf16 is slow"


def run_settings(args):
    """(settings, resumed): those the Accelerator is built from before open_run reads the run. A resumed
    run's own, from its state (the printed resume command names none of them), else the command line's;
    a value given on the resume that differs is refused later, by resumed_settings."""
    state = args.resume and args.output_dir and data.latest_state(Path(args.output_dir))
    return (vars(args) | read_progress(Path(args.output_dir))["config"] if state else vars(args)), bool(state)


def precision_chosen():
    """Whether the user chose the precision: `accelerate launch --mixed_precision` or a config file of
    accelerate's (accelerate config), or ACCELERATE_MIXED_PRECISION set by hand; a launch without them
    sets ACCELERATE_MIXED_PRECISION=no itself."""
    if LAUNCHER is None:
        return "ACCELERATE_MIXED_PRECISION" in os.environ
    given = any(launch_option(option) is not None for option in (b"--mixed_precision", b"--config_file"))
    exported = any(variable.startswith(b"ACCELERATE_MIXED_PRECISION=") for variable in LAUNCHER[1])
    return given or exported or Path(default_config_file).is_file()


def cpu_flags():
    try:
        with open("/proc/cpuinfo") as file:
            return set(next((line.split(":", 1)[1].split() for line in file if line.startswith("flags")), []))
    except OSError:
        return set()


class StopRequest:
    """Ctrl-C or SIGTERM asks the loop to stop at the next step; the processes agree through
    accelerate's trigger so none is left waiting in a collective."""

    def __init__(self, accelerator):
        self.requested = False
        self.estimate = True  # the time estimate is still to be printed
        self.accelerator = accelerator
        signal.signal(signal.SIGINT, self)
        signal.signal(signal.SIGTERM, self)

    def __call__(self, signum, frame):
        self.requested = True
        self.accelerator.set_trigger()


if __name__ == "__main__":
    main()
