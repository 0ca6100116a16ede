"""Model: torchvision's ResNet18 (ARCH: any torchvision ResNet) with a new last layer for our classes, and its
checkpoint format.

A checkpoint is a safetensors file holding the plain torchvision state dict (no wrapper prefix)
and string metadata that says what it holds: enough to rebuild the model with nothing else.
"""

import json
import math
import os
import pickle
import re
import warnings
from pathlib import Path

import torch
import torchvision
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from data import UserError, check_outside_states, run_state, special_file

# The network: any torchvision ResNet (resnet34, resnet50, wide_resnet50_2, ...) by its name. Checkpoints
# record it and evaluate.py rebuilds each from its own; --resume refuses a run of another.
ARCH = "resnet18"
HEAD = "fc"  # the new last layer: torchvision's name for it


def build_model(num_classes, stem="cifar", weights="imagenet", groups=None, zero_init_residual=False, arch=None):
    """The ARCH network (or arch: a checkpoint's) with a fresh num_classes head (a TwoStageHead when
    groups, lists of class indices, are given). weights: 'imagenet', 'none', or a local state dict
    (.pth or .safetensors, torchvision's key names; its head is ignored). stem 'cifar': the first
    convolution at stride 1 and no max-pool, so the blocks see 32x32, not torchvision's 8x8 (16x the
    compute, much better accuracy). zero_init_residual: each residual block starts as the identity
    (Goyal et al., 2017); loaded weights overwrite it."""
    arch = arch or ARCH
    model = torchvision.models.get_model(arch, zero_init_residual=zero_init_residual)
    if weights == "imagenet":
        imagenet = torchvision.models.get_model_weights(arch).IMAGENET1K_V1  # ResNet18's only; all ResNets have them
        try:
            state = imagenet.get_state_dict(progress=False)
        except Exception as error:
            raise UserError(
                f"could not download the ImageNet {arch} weights ({error}). Offline, pass "
                f"--weights PATH (a saved torchvision {arch} state dict) or --weights none."
            ) from error
        model.load_state_dict(state)
    elif weights != "none":
        load_backbone(model, weights, arch)
    features = model.fc.in_features  # the pooled features' width: 512 for ResNet18 and 34, 2048 from 50 up
    model.fc = TwoStageHead(groups, num_classes, features) if groups else torch.nn.Linear(features, num_classes)
    if stem == "cifar":
        model.conv1.stride = (1, 1)
        model.maxpool = torch.nn.Identity()
    return model


class TwoStageHead(torch.nn.Module):
    """Stage 1 picks a group (animals or vehicles), stage 2 a class within it, trained jointly.

    Returns log p(class) = log p(group) + log p(class | group): the usual cross-entropy trains both
    stages, and the argmax predicts through the hierarchy."""

    def __init__(self, groups, num_classes, features):
        super().__init__()
        self.group = torch.nn.Linear(features, len(groups))
        self.classes = torch.nn.Linear(features, num_classes)
        # Rebuilt from the checkpoint's metadata, so not saved with the weights.
        self.register_buffer("group_of", group_index(groups, num_classes), persistent=False)

    def forward(self, features):
        logits = self.classes(features)
        same_group = self.group_of[:, None] == self.group_of[None, :]
        within = logits - logits[:, None, :].masked_fill(~same_group, -math.inf).logsumexp(2)
        return self.group(features).log_softmax(1)[:, self.group_of] + within


def group_index(groups, num_classes):
    """Tensor mapping each class index to the index of its group (groups: lists of class indices)."""
    group_of = torch.empty(num_classes, dtype=torch.long)
    for index, members in enumerate(groups):
        group_of[members] = index
    return group_of


def is_head(name):
    return name.startswith(f"{HEAD}.")


def freeze_backbone(model, frozen):
    """--freeze-epochs: with frozen, only the head trains. The backbone's parameters take no gradient,
    so the backward pass stops at the head, and its BatchNorm layers keep their running statistics
    (eval mode). Call it after model.train(), each epoch; unfrozen, all trains again."""
    for name, module in model.named_children():
        if name != HEAD:
            module.requires_grad_(not frozen)
            if frozen:
                module.eval()


def load_backbone(model, path, arch):
    """Load a torchvision state dict of arch into model, all but the last layer, whatever that is
    (torchvision's 1000 classes, one of our runs' heads, a --two-stage run's TwoStageHead)."""
    check_weights_file(Path(path))  # its messages as before: the path as Path prints it
    try:
        if Path(path).suffix == ".safetensors":
            state = load_file(path)
        else:
            with warnings.catch_warnings():  # a plain pickle's "Detected pickle protocol 4": the error says it
                warnings.simplefilter("ignore")
                state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UserError(
            f"could not read weights {Path(path)} ({unreadable_weights(error)}); expected a .pth or .safetensors "
            f"state dict"
        ) from error
    if not is_state_dict(state):
        raise UserError(f"{path} holds no state dict; {state_dict_advice(state)}")
    state = {key.removeprefix("module."): value for key, value in state.items()}
    state = {key: value for key, value in state.items() if not is_head(key)}
    backbone = {key: value for key, value in model.state_dict().items() if not is_head(key)}
    problem = first_mismatch(backbone, state)
    if problem:
        raise UserError(f"{path} is not a torchvision {arch} state dict: {problem}")
    check_values(path, state, backbone)
    model.load_state_dict(state | {k: v for k, v in model.state_dict().items() if is_head(k)})


def is_state_dict(obj):
    return isinstance(obj, dict) and all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items())


def state_dict_advice(state):
    """What to save: a training checkpoint (Lightning's, a training loop's) holds the state dict under a key."""
    inside = [key for key, value in state.items() if is_state_dict(value)] if isinstance(state, dict) else []
    if inside:
        return f"its {inside[0]!r} is one: torch.save(checkpoint[{inside[0]!r}], path)"
    return "save one with torch.save(model.state_dict(), path)"


def check_values(path, state, expected):
    """Refuse weights no training could leave, each of which torch loads with a warning at most, and
    the first step's loss is then NaN, whatever the lr: NaN or infinite values (in the network's dtype:
    float64's 1e300 is finite, and inf in float32), complex ones (their imaginary part would be dropped)
    and negative BatchNorm variances; and tensors without values, or not dense, which crash the checks."""
    for key, value in state.items():
        if value.is_meta or value.layout != torch.strided:
            kind = "meta tensors, without values" if value.is_meta else f"{value.layout} tensors".replace("torch.", "")
            raise UserError(f"{path} holds {kind} ({key}); save a trained network's model.state_dict()")
        if expected[key].is_floating_point() and not value.is_floating_point():
            raise UserError(f"{path} holds {str(value.dtype).removeprefix('torch.')} values ({key}), not real "
                            f"floating point ones; pass weights of a run that trained")  # fmt: skip
        if value.is_floating_point() and not value.to(expected[key].dtype).isfinite().all():
            raise UserError(f"{path} holds NaN or infinite values ({key}); pass weights of a run that trained")
        if key.endswith("running_var") and (value < 0).any():
            raise UserError(f"{path} holds negative BatchNorm variances ({key}); pass weights of a run that trained")


def unreadable_weights(error):
    """Why torch.load or safetensors could not read a weights file, in a few words. torch's unpickling
    errors run to many lines, all about weights_only=False, which would run the file's code."""
    text = str(error)
    if isinstance(error, pickle.UnpicklingError) and "Unsupported global" in text:  # torch.save(model)
        name = re.search(r"GLOBAL (\S+)", text)
        found = f" ({name.group(1)})" if name else ""
        return f"it holds pickled objects{found}, not tensors alone: save model.state_dict() instead"
    # a text file is a KeyError of pickle's opcode ('101'), an empty one an EOFError without a message, any
    # other file pickle cannot read an UnpicklingError ("Unsupported operand 206")
    if isinstance(error, (KeyError, EOFError, pickle.UnpicklingError)):
        return "not a file torch.save or safetensors wrote"
    if isinstance(error, RuntimeError):  # from torch.load's zip reader
        return "a truncated torch.save file, or another kind of zip"
    return text.strip().split("\n")[0].split(". ")[0]


def check_weights_file(path):
    """Refuse a --weights path that is no file, before any data is read."""
    not_a_folder(path, "--weights ")
    if not Path(path).is_file():
        raise UserError(f"weights file {path} not found; pass an existing file, or --weights none")


def first_mismatch(expected, found):
    """Describe the first key that is missing, extra or of another shape, or return None."""
    for key, tensor in expected.items():
        if key not in found:
            return f"missing key {key!r}"
        if tuple(found[key].shape) != tuple(tensor.shape):
            return f"{key!r} has shape {tuple(found[key].shape)}, expected {tuple(tensor.shape)}"
    extra = [key for key in found if key not in expected]
    return f"unexpected key {extra[0]!r}" if extra else None


# ---------------------------------------------------------------------------------- the checkpoint format


def save_checkpoint(model, path, metadata):
    state = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    text = {key: value if isinstance(value, str) else json.dumps(value) for key, value in metadata.items()}
    write_atomically(path, lambda temporary: save_file(state, temporary, metadata=text))


def load_checkpoint(path):
    """Rebuild the model from a checkpoint written by train.py; return (model, metadata)."""
    path = Path(path)
    not_a_folder(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found; pass the best.safetensors or last.safetensors of a run")
    try:
        with safe_open(path, framework="pt") as file:
            metadata = decode_metadata(file.metadata() or {})
            state = {key: file.get_tensor(key) for key in file.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise UserError(
            f"{path} is not a readable safetensors file ({error}); is it truncated or of another format?"
        ) from error
    needed = ("arch", "classes", "stem", "mean", "std", "seed", "val_fraction")
    if metadata.get("arch") not in torchvision.models.list_models() or not all(key in metadata for key in needed):
        raise UserError(
            f"{path} was not written by train.py (its metadata needs a torchvision arch, {', '.join(needed[1:])}); "
            f"pass a run's best.safetensors"
        )
    arch = metadata["arch"]  # the checkpoint's own, whatever ARCH says today
    model = build_model(len(metadata["classes"]), metadata["stem"], "none", metadata.get("groups"), arch=arch)
    problem = first_mismatch(model.state_dict(), state)
    if problem:
        raise UserError(
            f"{path} does not fit a {metadata['stem']}-stem {arch} for {len(metadata['classes'])} classes: {problem}"
        )
    problem = metadata_problem(metadata)
    if problem:
        raise UserError(f"{path}: {problem}, so it cannot be evaluated as trained (edited?); pass a run's checkpoint")
    model.load_state_dict(state)
    return model, metadata


def metadata_problem(metadata):
    """What of a checkpoint's preprocessing and temperature would not run, or would score wrongly (a
    negative temperature reverses the probabilities), in words; None when all is well."""

    def fine(values, low, kind):
        return all(isinstance(v, kind) and not isinstance(v, bool) and math.isfinite(v) and v > low for v in values)

    rules = [("mean", 3, -math.inf, (int, float), "3 numbers"), ("std", 3, 0, (int, float), "3 numbers above 0")]
    rules += [(key, 1, 0, int, "a whole number above 0") for key in ("image_size", "input_size", "eval_crop")]
    rules += [("temperature", 1, 0, (int, float), "a number above 0")]
    for key, count, low, kind, wanted in rules:
        value = metadata.get(key, 1)  # sizes and the temperature: older checkpoints lack them
        values = value if count > 1 else [value]
        if not (isinstance(values, list) and len(values) == count and fine(values, low, kind)):
            return f"its {key} is {value!r}, not {wanted}"
    stored = metadata.get("image_size", 32)  # checkpoints from before photos: CIFAR's 32x32
    if metadata.get("eval_crop", stored) > stored:
        return f"its eval_crop {metadata['eval_crop']} is larger than the stored side of its images, {stored}"
    return None


def best_record(history):
    """The record of history.json with the lowest validation loss: the epoch best.safetensors holds.
    After --small-epochs, among the epochs at --input-size alone: a loss at another size does not compare."""
    size = history[-1].get("input_size")  # records older than the field were all at the run's one size
    return min((r for r in history if r.get("input_size", size) == size), key=lambda r: r["val_loss"])


def not_a_folder(path, flag=""):
    """Refuse a folder given for a checkpoint, naming the run's best.safetensors if it has one (a run's
    folder, or its state/), and a FIFO, socket or device, which is no file to read."""
    path = Path(path)
    if path.is_dir():
        best = (path.parent if run_state(path) else path) / "best.safetensors"
        named = best if best.is_file() else "a run's best.safetensors (that folder has none)"
        raise UserError(f"{flag}{path} is a folder; pass a run's checkpoint: {named}")
    if special_file(path):
        raise UserError(f"{flag}{path} is a FIFO, socket or device, not a file; pass a file")


def decode_metadata(text):
    def decode(value):
        try:
            return json.loads(value)
        except ValueError:
            return value  # plain strings are stored as they are

    return {key: decode(value) for key, value in text.items()}


# ---------------------------------------------------------------------------------- file safety


def write_atomically(path, write):
    """write(temporary) next to path, then rename it over path: a crash or a full disk at any point
    leaves the old file whole, and no temporary file behind. The temporary's name is this process's, so
    that it never takes a user's file (model.onnx.tmp) or another process's."""
    temporary = Path(f"{path}.tmp-{os.getpid()}")
    try:
        write(temporary)
        usual_permissions(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def usual_permissions(path):
    """safetensors creates files that only their owner can read (0600); give them the mode the
    user's umask gives any new file."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def check_folder_can_be_made(folder, flag, given):
    """Refuse a folder to write in that is a file, not writable, or inside a run's resumable state."""
    check_outside_states(folder, flag, given)
    existing = next(path for path in (folder, *folder.absolute().parents) if path.exists())
    if not existing.is_dir():
        raise UserError(f"{flag} {given}: {existing} is a file, not a folder; pass another {flag}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {given}: cannot write in {existing}; pass a {flag} you can write to")
