"""No training or validation step waits for the device, outside the steps that read the loss.

On a GPU, a step that copies between host and device blocks until the GPU has caught up, so the
host can no longer queue the next step while the GPU runs this one. Without a GPU, the tests count
calls to the entry points that would block; with one, CUDA's sync debug mode checks the steps."""

import collections
import functools
import sys

import pytest
import torch
from accelerate import Accelerator
from conftest import quick_args

import train

# Tensor methods that read a value back to the host, or whose output size depends on the values.
READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy", "nonzero", "unique")
FUNCTIONS = ("nonzero", "unique", "bincount", "masked_select", "repeat_interleave")
# Callers whose tensors never leave the host: the sampler draws each epoch's order from a CPU generator.
HOST_ONLY = ("torch.utils.data.sampler",)
LOG_EVERY = 4
STEPS = 10  # 160 training images in batches of 16
VAL_BATCHES = 5  # 40 validation images in batches of 8


class Steps:
    """Follows train.py through its steps: a training step starts at train_step, a validation
    step at gather_for_metrics; the time outside train_epoch and validate is no step."""

    def __init__(self, monkeypatch, on_step):
        self.on_step, self.phase, self.index = on_step, None, 0
        monkeypatch.setattr(train, "LOG_EVERY", LOG_EVERY)
        monkeypatch.setattr(train, "VAL_BATCH_SIZE", 8)
        for name in ("train_epoch", "validate"):
            monkeypatch.setattr(train, name, self.phase_of(getattr(train, name)))
        monkeypatch.setattr(train, "train_step", self.marked(train.train_step))
        monkeypatch.setattr(Accelerator, "gather_for_metrics", self.marked(Accelerator.gather_for_metrics))

    def phase_of(self, function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            self.phase, self.index = function.__name__, 0
            try:
                return function(*args, **kwargs)
            finally:
                self.phase = None
                self.on_step(None, None)

        return wrapper

    def marked(self, function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            if self.phase is not None:
                self.index += 1
                self.on_step(self.phase, self.index)
            return function(*args, **kwargs)

        return wrapper


def reads_the_loss(phase, index):
    """Steps allowed to wait: training steps that log, and the last validation step, which holds the
    summary after the loop (its own batch still counts in the step before)."""
    if phase == "train_epoch":
        return index % LOG_EVERY == 0 or index == STEPS
    return index == VAL_BATCHES


# The parts of the step that options add: EMA, targeted augmentation, class weights; and the training
# controls, with a frozen epoch and then an unfrozen one, batches of 8 accumulated to STEPS steps of 16.
OPTIONS = {
    "ema-targeted-weights": ["--epochs", "1", "--ema", "0.9", "--targeted-augment", "animals",
                             "--class-weights", "auto"],
    "training-controls": ["--epochs", "2", "--batch-size", "8", "--grad-accum-steps", "2", "--clip-grad-norm", "1",
                          "--mixup", "0.2", "--cutmix", "1", "--auto-augment", "ta_wide", "--freeze-epochs", "1",
                          "--backbone-lr-mult", "0.1"],
    "randaugment": ["--epochs", "1", "--auto-augment", "ra"],
}  # fmt: skip


def a_short_run(tmp_path, image_folder, options, weights_file):
    flags = [*OPTIONS[options], "--max-train-samples", "160"]  # all of them: STEPS steps
    if "--freeze-epochs" in flags:
        flags += ["--weights", str(weights_file)]
    train.main(quick_args(image_folder, tmp_path / "run", *flags))


@pytest.mark.parametrize("options", OPTIONS)
def test_no_step_reads_from_the_device_outside_logging_steps(
    options, image_folder, tmp_path, monkeypatch, weights_file
):
    calls = collections.defaultdict(list)  # (phase, step) -> names of the calls that would wait
    current = [None]

    def on_step(phase, index):
        current[0] = (phase, index) if phase else None

    def counted(function, name, waits=lambda *args, **kwargs: True):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__")
            if current[0] is not None and caller not in HOST_ONLY and waits(*args, **kwargs):
                calls[current[0]].append(name)
            return function(*args, **kwargs)

        return wrapper

    def from_python(data, *args, device=None, **kwargs):
        return device is not None and not isinstance(data, torch.Tensor)

    def crosses_devices(tensor, *args, non_blocking=False, **kwargs):
        """A blocking copy from one device to another: to(device), to(tensor) or copy_(source). On a
        machine without a GPU there is none: host and device are one."""
        kinds = (str, torch.device, torch.Tensor)
        other = next((a for a in (*args, kwargs.get("device")) if isinstance(a, kinds)), None)
        device = other.device if isinstance(other, torch.Tensor) else other
        return device is not None and torch.device(device).type != tensor.device.type and not non_blocking

    def boolean_mask(tensor, index):
        parts = index if isinstance(index, tuple) else (index,)
        return any(isinstance(part, torch.Tensor) and part.dtype == torch.bool for part in parts)

    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counted(getattr(torch.Tensor, name), f"Tensor.{name}"))
    for name in FUNCTIONS:
        monkeypatch.setattr(torch, name, counted(getattr(torch, name), f"torch.{name}"))
    for name in ("tensor", "as_tensor"):
        monkeypatch.setattr(torch, name, counted(getattr(torch, name), f"torch.{name}(device=)", from_python))
    for name in ("to", "copy_"):
        monkeypatch.setattr(torch.Tensor, name, counted(getattr(torch.Tensor, name), f"Tensor.{name}", crosses_devices))
    monkeypatch.setattr(torch.Tensor, "__getitem__", counted(torch.Tensor.__getitem__, "mask[]", boolean_mask))
    Steps(monkeypatch, on_step)

    a_short_run(tmp_path, image_folder, options, weights_file)

    waiting = {step: names for step, names in calls.items() if not reads_the_loss(*step)}
    assert not waiting, f"steps that wait for the device: {waiting}"
    # the counting works: logging steps read the loss
    assert all("Tensor.item" in calls["train_epoch", i] for i in (LOG_EVERY, 2 * LOG_EVERY, STEPS))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: torch.cuda.set_sync_debug_mode checks a GPU")
@pytest.mark.parametrize("options", OPTIONS)
def test_no_step_synchronizes_with_the_gpu_outside_logging_steps(
    options, image_folder, tmp_path, monkeypatch, weights_file
):
    def on_step(phase, index):
        torch.cuda.set_sync_debug_mode("error" if phase and not reads_the_loss(phase, index) else "default")

    Steps(monkeypatch, on_step)
    try:
        a_short_run(tmp_path, image_folder, options, weights_file)
    finally:
        torch.cuda.set_sync_debug_mode("default")
