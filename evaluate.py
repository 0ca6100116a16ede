"""Evaluate a checkpoint written by train.py: accuracy, per-class analysis, the run's curves; or
classify new images.

    python evaluate.py runs/<name>/best.safetensors                  # CIFAR-10 test set
    python evaluate.py runs/<name>/best.safetensors --split val      # the run's own validation split
    python evaluate.py CKPT --data-dir DIR --json results.json --tta
    python evaluate.py CKPT --predict photo.jpg more/photos/ --csv predictions.csv
    python evaluate.py CKPT --export-onnx model.onnx --data-dir DIR

The report goes to the console; curves.png and <stem>_<split>[_tta]_confusion.png, _per_class.png,
_calibration.png and _mistakes.png beside the checkpoint (or to --plot-dir); --predict's contact
sheets, <stem>_predictions[_N].png. Images are preprocessed as the checkpoint records that training did.
"""

import contextlib
import csv
import functools
import io
import itertools
import json
import math
import os
import re
import signal
import sys
import time
from pathlib import Path

# Ctrl-C during the slow imports below: exit quietly, with os._exit (train.py says why)
if __name__ == "__main__":
    signal.signal(signal.SIGINT, lambda signum, frame: os._exit(130))

import matplotlib  # noqa: E402

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from PIL import Image  # noqa: E402

import data  # noqa: E402
from data import bounded  # noqa: E402
from model import best_record, check_folder_can_be_made, group_index, load_checkpoint, write_atomically  # noqa: E402

if __name__ == "__main__":  # imported: from here on main() handles Ctrl-C
    signal.signal(signal.SIGINT, signal.default_int_handler)

TOP_CONFUSIONS = 5
TOP_K = 3  # --predict's classes shown per image, unless --top-k says
PLOT_KINDS = ("confusion", "per_class", "calibration", "mistakes", "explained")  # <stem>_<split>[_tta]_<kind>.png
BATCH_PIXELS = 1024 * 32**2  # a pass's input pixels by default: 1024 CIFAR images, or 20 photos at 224x224
MISTAKE_PAIRS, MISTAKES_PER_PAIR = 4, 6  # mistakes.png: rows of the most confused pairs, their worst images
SHEET_COLUMNS, SHEET_ROWS = 8, 6  # --predict: images per contact sheet
GROUP_COLORS = {"vehicles": "tab:blue", "animals": "tab:orange"}
HISTORY_FIELDS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc")
CALIBRATION_BINS = 15  # equal-width confidence bins of the ECE and the reliability diagram (Guo et al. 2017)
# the temperature's search bounds: on a split the network gets all right, the NLL falls as T goes to 0
TEMPERATURE_RANGE = (0.05, 20.0)
# a temperature fitted on fewer validation images is said to be a guess: a few confident mistakes
# decide it (on 50 photos it made 49 held-out ones worse; on 4,000 CIFAR images it helped: bench/after_training.md)
FEW_FOR_CALIBRATION = 1000
RUNS_OWN = "the run's own data"  # load_split's word on a validation split of the run's data
# --export-onnx: the check runs the file with onnxruntime on ONNX_CHECK_IMAGES images of the split
# (--data-dir) or ONNX_SYNTHETIC random ones, and refuses a logit further than ONNX_TOLERANCE from
# PyTorch's on the CPU (float32 differences are about 1e-6 here) or another top-1 class.
ONNX_CHECK_IMAGES, ONNX_SYNTHETIC, ONNX_TOLERANCE = 1000, 16, 1e-3
ONNX_PACKAGES = "pip install -r requirements-dev.txt (onnx, onnxruntime, onnxscript)"


def main(argv=None):
    try:
        with data.quiet_when_closed():  # `evaluate.py ... | head`: the files asked for are written all the same
            args = parse_args(argv)
            (export_onnx if exporting(args) else classify if args.predict else evaluate)(args)
    except data.UserError as error:
        sys.exit(f"error: {' '.join(str(error).split())}")  # one line, whatever the message
    except KeyboardInterrupt:
        sys.exit(130)


def evaluate(args):
    model, metadata = run_checkpoint(args.checkpoint)
    classes = metadata["classes"]
    run_data_from(args, metadata)
    folders = output_folders(args, metadata)
    if not args.no_plots:  # a PNG of yours in the way is said now, not after the evaluation
        check_plots_are_ours(plot_folder(args), evaluation_plots(args).values())
    images, labels, data_check = load_split(args, metadata)
    create(folders)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    logits = predict(model, images, metadata, args.batch_size, args.tta, device)
    predictions = logits.argmax(1)
    confusion = confusion_matrix(labels, predictions, len(classes))
    precision, recall, f1 = precision_recall_f1(confusion)
    history, history_problem = read_history(args.checkpoint, metadata)
    results = {
        "split": args.split,
        "num_samples": len(labels),
        "accuracy": (predictions == labels).double().mean().item(),
        "loss": F.cross_entropy(logits, labels).item(),
        "per_class": dict(zip(classes, recall.tolist())),
        "per_class_precision": dict(zip(classes, precision.tolist())),
        "per_class_recall": dict(zip(classes, recall.tolist())),  # = per_class, kept for older readers
        "per_class_f1": dict(zip(classes, f1.tolist())),
        "confusion": confusion.tolist(),
        "groups": group_accuracies(recall, classes),
        "stage1_accuracy": stage1_accuracy(logits, labels, classes),
        "top_confusions": top_confusions(confusion, classes),
        "overfitting": overfitting(history, metadata.get("config", {})),
        "calibration": calibration_report(logits, labels, metadata),
        "tta": args.tta,
        "checkpoint": str(args.checkpoint),
        "data_check": data_check,
    }
    print_report(results, classes)
    if history_problem:
        print(f"\n{history_problem}")
    if args.json:
        earlier = results_in(args.json)
        with writing(args.json, "--json"):  # under a temporary name, then renamed: a failed write keeps the old file
            write_atomically(args.json, lambda temporary: temporary.write_text(json.dumps(results, indent=1)))
        print(f"\nresults: {args.json}")
        if earlier and earlier != (results["checkpoint"], args.split, args.tta):
            print(f"replaced the results of {earlier[0]} (--split {earlier[1]}{' --tta' * earlier[2]}) it held")
    if not args.no_plots:
        explain = (model, metadata, device) if args.explain else None
        write_plots(args, results, confusion, classes, history, (images, labels, logits.softmax(1)), explain)


def print_report(results, classes):
    print(f"{describe(results)}: {results['num_samples']} images")
    if results["split"] == "val":
        print(f"data: {results['data_check']}")
    print(f"accuracy {results['accuracy']:.2%}   loss {results['loss']:.4f}")
    print(calibration_line(results["calibration"], results["split"] == "val" and results["data_check"]) + "\n")
    accuracies = [results["per_class"][name] for name in classes]
    order = sorted(range(len(classes)), key=lambda i: -accuracies[i])
    marks = best_and_worst(accuracies)
    width = max(len("macro"), *(len(c) for c in classes))
    # A class's accuracy is its recall (the share of its images predicted as it): one column for both.
    columns = ("per_class", "per_class_precision", "per_class_f1")
    print(f"{'class':<{width}}   accuracy  precision         F1   (per-class accuracy = recall)")
    for i in order:
        cells = "".join(f"  {results[column][classes[i]]:9.2%}" for column in columns)
        print(f"{classes[i]:<{width}}{cells}  {marks.get(i, '')}".rstrip())
    macro = "".join(f"  {sum(results[column].values()) / len(classes):9.2%}" for column in columns)
    print(f"{'macro':<{width}}{macro}")
    if results["groups"]:
        g = results["groups"]
        print(f"\nvehicles {g['vehicles']:.2%}   animals {g['animals']:.2%}   gap {100 * g['gap']:.2f} points")
        print(f"stage 1 (vehicles or animals) accuracy {results['stage1_accuracy']:.2%}")
    if results["top_confusions"]:
        print("\nmost confused (true -> predicted):")
        for c in results["top_confusions"]:
            print(f"  {c['true']:>{width}} -> {c['pred']:<{width}}  {c['count']}")
    o = results["overfitting"]
    if o:

        def number(value, unit=""):
            return "n/a (a loss of 0)" if value is None else f"{value:.{1 if unit else 2}f}{unit}"

        size, final = o.get("best_input_size"), o.get("final_input_size")
        at = f" at {size}x{size}" if size else ""
        at += f", before any epoch at --input-size {final}" if size and final and size != final else ""
        print(
            f"\nhistory: best epoch {o['best_epoch']} (the lowest validation loss{at}); "
            f"validation loss rose {number(o['val_loss_increase_pct'], '%')} from there to the last epoch\n"
            f"train-val accuracy gap: {o['train_val_acc_gap_best']:.2f} points at the best epoch, "
            f"{o['train_val_acc_gap_last']:.2f} at the last\n"
            f"val/train loss ratio: {number(o['loss_ratio_best'])} at the best epoch, "
            f"{number(o['loss_ratio_last'])} at the last"
        )
        if o["mixed_training_batches"]:
            print(
                "(the run trained on mixed batches, --mixup/--cutmix: its training loss and accuracy are against "
                "each image's larger share's label, so they sit below an unmixed run's and the gaps read smaller)"
            )


def run_checkpoint(path):
    """load_checkpoint, with where the data is as the run says now: a checkpoint written before a resume
    that moved --data-dir or --cache-dir (best.safetensors of an earlier epoch) records the old places."""
    model, metadata = load_checkpoint(path)
    config = metadata.get("config", {})
    state = data.latest_state(Path(path).parent)  # None: not in a run folder
    try:
        now = json.loads((state / "progress.json").read_text())["config"]
    except (TypeError, OSError, ValueError, KeyError):
        return model, metadata
    if isinstance(now, dict) and now.get("data_fingerprint") == config.get("data_fingerprint"):  # the same data
        metadata["config"] = config | {key: now.get(key) for key in ("data_dir", "cache_dir")}
    return model, metadata


def run_data_from(args, metadata):
    recorded = metadata.get("config", {}).get("data_dir")
    if not args.data_dir and recorded and not Path(recorded).exists():
        raise data.UserError(f"the run's data folder {recorded} does not exist any more (moved?); pass --data-dir")
    args.data_dir = args.data_dir or recorded or "./data"


def load_split(args, metadata):
    """The images to evaluate on: the test split, or the exact validation split of the run, and what
    was checked of the data: the validation split is only the run's own when the folder holds the
    data the run was split from."""
    side = stored_side(metadata)
    root = Path(args.data_dir)
    # the run's own cache unless one is given: the run decoded its images there, not into the default one
    cache = data.cache_location(args.cache_dir or metadata.get("config", {}).get("cache_dir"))
    # --export-onnx compares two networks on any images: their classes and their past do not matter
    classes = None if exporting(args) else metadata["classes"]
    if args.split == "test" and (root / "train").is_dir() and not (root / "test").is_dir():
        raise data.UserError(
            f"{root} has no test/ folder; pass --split val for the run's validation images, or add {root}/test/<class>/"
        )
    # a held-out folder holding the run's training images (or train/'s beside it) is refused
    dirs = () if exporting(args) else data_dirs(args, metadata)
    trained = {Path(d, "train").resolve() for d in dirs if d and Path(d, "train").is_dir()}
    if args.split == "test":
        images, labels, _ = data.load_images(args.data_dir, "test", side, classes, cache, trained)
        return images, labels, "any labelled test set is fair"
    alone = data.val_folder_in(root)
    if not (root / "train").is_dir() and not alone and (root / "test").is_dir():
        raise data.UserError(
            f"{root} has test/ but no train/ or val/ to take a validation split from; drop --split val"
        )
    if not (root / "train").is_dir() and alone:  # DIR/val/<class>/ on its own, as test/ alone: all of it
        images, labels, _ = data.load_images(args.data_dir, alone.name, side, classes, cache, trained)
        return images, labels, f"{alone} on its own, whole: none of the run's training images"
    checked = []

    def check(found, _counts):  # before anything is decoded: other data is refused at once
        if exporting(args):  # its check compares two networks on any images: nothing is scored
            return checked.append("not checked: --export-onnx compares the networks on any images")
        expected = metadata.get("config", {}).get("data_fingerprint")
        difference = expected and data.validation_difference(expected, found)
        if expected is None:
            checked.append("unchecked: the checkpoint predates data fingerprints")
            print(f"warning: {checked[0]}; the validation split is the run's only if {args.data_dir} is its data")
        elif difference and not (args.skip_data_check and data.same_validation_source(expected, found)):
            skip = ", or --skip-data-check" if data.same_validation_source(expected, found) else ""
            raise data.UserError(
                f"{args.data_dir} is not the data this run was split from ({difference}), so its validation split "
                f"would hold other images, some perhaps trained on. Restore the run's images, or pass --data-dir DIR "
                f"where they are{skip}"
            )
        else:
            checked.append(f"skipped (--skip-data-check): {difference}" if difference else RUNS_OWN)

    splits, _, _, _ = data.load_split(
        args.data_dir,
        side,
        metadata["val_fraction"],
        metadata["seed"],
        parts=("val",),
        expected_classes=classes,
        cache_dir=cache,
        check=check,
    )
    return splits["val"].images, splits["val"].labels, checked[0]


def stored_side(metadata):
    """The side images were kept at in training (checkpoints from before photos: 32)."""
    return metadata.get("image_size", data.IMAGE_SIZE)


def default_batch(size):
    return max(1, BATCH_PIXELS // size**2)


def evaluation_input(metadata, device):
    """(the network's input side, the function from stored uint8 batches to its inputs): the centre
    crop, resize and normalisation of the checkpoint's evaluation."""
    size, crop = metadata.get("input_size", data.IMAGE_SIZE), metadata.get("eval_crop", stored_side(metadata))
    return size, data.normalizer(metadata["mean"], metadata["std"], size, device, crop=crop)


def predict(model, images, metadata, batch_size, tta, device):
    """Logits for every image, in large batches; with tta, averaged with the mirrored image's."""
    # moved before inference mode: its weights stay ordinary tensors, which Grad-CAM can differentiate
    model.eval().to(device, memory_format=torch.channels_last)
    size, normalize = evaluation_input(metadata, device)
    batch_size = batch_size or default_batch(size)
    logits = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = normalize(images[start : start + batch_size].to(device))
            out = model(batch)
            if tta:
                out = (out + model(batch.flip(3))) / 2
            logits.append(out.float().cpu())
    return torch.cat(logits)


# ---------------------------------------------------------------------------------- the scores


def confusion_matrix(labels, predictions, num_classes):
    """Counts, rows = true class, columns = predicted class."""
    flat = labels * num_classes + predictions
    return torch.bincount(flat, minlength=num_classes**2).reshape(num_classes, num_classes)


def precision_recall_f1(confusion):
    """Per-class precision, recall (= per-class accuracy) and F1; 0 where undefined."""
    confusion = confusion.double()
    hits = confusion.diag()
    precision = hits / confusion.sum(0).clamp(min=1)
    recall = hits / confusion.sum(1).clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    return precision, recall, f1


def group_accuracies(recall, classes):
    """Mean per-class accuracy of each group in data.GROUPS, and vehicles minus animals; None
    when the groups do not name these classes."""
    groups = data.group_of_classes(classes)
    if groups is None:
        return None
    result = {name: recall[members].mean().item() for name, members in groups.items()}
    result["gap"] = result["vehicles"] - result["animals"]
    return result


def stage1_accuracy(logits, labels, classes):
    """How often the predicted group (vehicles or animals) is right: the first stage of --two-stage,
    and for any model the probability mass summed within each group."""
    groups = data.group_of_classes(classes)
    if groups is None:
        return None
    group_of = group_index(list(groups.values()), len(classes))
    group_probs = torch.zeros(len(logits), len(groups)).index_add_(1, group_of, logits.softmax(1))
    return (group_probs.argmax(1) == group_of[labels]).double().mean().item()


def top_confusions(confusion, classes, k=TOP_CONFUSIONS):
    off_diagonal = confusion.clone().fill_diagonal_(0)
    counts, flat = off_diagonal.flatten().topk(min(k, off_diagonal.numel()))
    n = len(classes)
    return [
        {"true": classes[i // n], "pred": classes[i % n], "count": int(c)}
        for c, i in zip(counts.tolist(), flat.tolist())
        if c > 0
    ]


def overfitting(history, config=None):
    """The seed write-up's overfitting figures from a run's history (accuracy gaps in points), and
    whether its training batches were mixed (--mixup, --cutmix: its training figures are then
    against each image's larger share's label)."""
    if not history:
        return None
    best = best_record(history)
    last = history[-1]

    def ratio(a, b):  # None where a loss is 0: a perfect fit has no ratio
        return a / b if b > 0 else None

    increase = ratio(last["val_loss"] - best["val_loss"], best["val_loss"])
    return {
        "best_epoch": best["epoch"],
        # after --small-epochs, the best among the epochs at the last one's size (model.best_record)
        "best_input_size": best.get("input_size"),
        "final_input_size": (config or {}).get("input_size"),
        "val_loss_increase_pct": None if increase is None else 100 * increase,
        "train_val_acc_gap_best": 100 * (best["train_acc"] - best["val_acc"]),
        "train_val_acc_gap_last": 100 * (last["train_acc"] - last["val_acc"]),
        "loss_ratio_best": ratio(best["val_loss"], best["train_loss"]),
        "loss_ratio_last": ratio(last["val_loss"], last["train_loss"]),
        "mixed_training_batches": bool(config and (config.get("mixup") or config.get("cutmix"))),
    }


def read_history(checkpoint, metadata):
    """The run's history.json beside the checkpoint: (records, None); (None, None) when there is
    none; (None, why) when it cannot be used (unreadable, or another run's: its record of the checkpoint's
    epoch is not the checkpoint's), so that the evaluation itself still runs."""
    path = Path(checkpoint).with_name("history.json")
    if not path.exists():
        return None, None
    try:
        history = json.loads(path.read_text())
        if not isinstance(history, list) or not history:
            raise ValueError("expected a non-empty list of epoch records")
        for number, record in enumerate(history, 1):
            numbers = record if isinstance(record, dict) else {}
            missing = [key for key in HISTORY_FIELDS if not isinstance(numbers.get(key), (int, float))]
            if not missing and min(numbers["train_loss"], numbers["val_loss"]) < 0:
                missing = ["a loss of 0 or more"]
            if missing:
                raise ValueError(f"record {number} has no number for {', '.join(missing)}")
    except (OSError, ValueError) as error:
        return None, f"history: {path} is unreadable ({error}); no overfitting analysis or curves"
    epoch, val_loss = metadata.get("epoch"), metadata.get("val_loss")  # a checkpoint that records them
    if epoch and not any(record["epoch"] == epoch and record["val_loss"] == val_loss for record in history):
        return None, (
            f"history: {path} has no record of this checkpoint's epoch {epoch} (validation loss {val_loss:.4f}): "
            f"another run's, or older than the checkpoint; no overfitting analysis or curves"
        )
    return history, None


# ---------------------------------------------------------------------------------- the report


def describe(results):
    return f"{results['checkpoint']}, {results['split']} split, TTA {'on' if results['tta'] else 'off'}"


def calibration_line(report, data_check):
    """ECE, NLL and Brier at T = 1, and at the checkpoint's temperature when it has one. data_check:
    load_split's word on a validation split (False for the test split): the temperature was fitted on
    the run's own, so on those images the calibrated scores are optimistic."""
    raw, calibrated = report["raw"], report["calibrated"]
    names = {"ece": "ECE", "nll": "NLL", "brier": "Brier"}
    if calibrated is None:
        values = ", ".join(f"{label} {raw[key]:.4f}" for key, label in names.items())
        return f"calibration ({CALIBRATION_BINS} equal-width bins for the ECE): {values}; an uncalibrated checkpoint " \
               f"(no temperature: written before train.py fitted one)"  # fmt: skip
    values = ", ".join(f"{label} {raw[key]:.4f} -> {calibrated[key]:.4f}" for key, label in names.items())
    fitted = "fitted on the run's validation split"
    if data_check == RUNS_OWN:
        fitted = "fitted on this split: optimistic"
    elif data_check:  # not checked, or not the run's data, or val/ alone: they may still be its images
        fitted += ": optimistic if these are its images"
    caveat = f"\n{report['caveat']}" if report["caveat"] else ""
    return (
        f"calibration ({CALIBRATION_BINS} equal-width bins for the ECE), at T = 1 -> at the checkpoint's T = "
        f"{calibrated['temperature']:.3f} ({fitted}): {values}{caveat}"
    )


def best_and_worst(accuracies):
    """Marks for the best three and worst two classes (index: "best" or "worst"); fewer with few
    classes, so none gets both. A class tied with one left unmarked is not marked: of ten classes at
    0.00%, none is "best"."""
    order = sorted(range(len(accuracies)), key=lambda i: -accuracies[i])
    n_marked = len(order) // 2
    n_best, n_worst = min(3, n_marked), min(2, n_marked)
    best = [i for i in order[:n_best] if accuracies[i] > accuracies[order[n_best]]]
    worst = [i for i in order[len(order) - n_worst :] if accuracies[i] < accuracies[order[-n_worst - 1]]]
    return {i: "best" for i in best} | {i: "worst" for i in worst}


# ---------------------------------------------------------------------------------- plots


def evaluation_plots(args):
    """The files an evaluation may draw, named after checkpoint, split and TTA, so that evaluations
    sharing a folder do not overwrite each other; the curves come from the run's history, the same
    for best and last."""
    prefix = f"{Path(args.checkpoint).stem}_{args.split}{'_tta' if args.tta else ''}"
    return {kind: f"{prefix}_{kind}.png" for kind in PLOT_KINDS} | {"curves": "curves.png"}


def write_plots(args, results, confusion, classes, history, shown, explain=None):
    folder, plot = plot_folder(args), evaluation_plots(args)
    title, names = printable(describe(results)), [printable(name) for name in classes]  # as drawn
    per_class = dict(zip(names, results["per_class"].values()))
    figures = {
        plot["confusion"]: lambda: plot_confusion(confusion, names, title),
        plot["per_class"]: lambda: plot_per_class(per_class, names, title),
        plot["calibration"]: lambda: plot_calibration(results["calibration"], title),
    }
    if results["top_confusions"]:
        images, labels, probabilities = shown
        rows = mistake_rows(labels, probabilities, results["top_confusions"], classes)
        figures[plot["mistakes"]] = lambda: plot_mistakes(images, probabilities, rows, names, title)
        if explain:  # (model, metadata, device): the maps of the same images, for the predicted and true class
            chosen = torch.tensor([i for _, _, wrong in rows for i in wrong])
            targets = torch.stack([probabilities[chosen].argmax(1), labels[chosen]])
            seen, maps = explained(*explain, images[chosen], targets)
            figures[plot["explained"]] = lambda: plot_explained(seen, maps, probabilities, rows, names, title)
    elif explain:
        print("\n--explain: no mistakes on this split, so no heat maps to draw")
    data_dir = Path(args.data_dir).resolve()
    shows = f"evaluate.py {Path(args.checkpoint).resolve()} --data-dir {data_dir} --split {args.split}"
    shown = dict.fromkeys(figures, printable(shows + " --tta" * args.tta))
    if history:
        source = Path(args.checkpoint).with_name("history.json")
        figures[plot["curves"]] = lambda: plot_curves(history, printable(f"training curves: {source}"))
        shown[plot["curves"]] = printable(f"evaluate.py curves of {source.resolve()}")
    elif drawn_here(folder / plot["curves"]):  # kept: the history it was drawn from may be gone
        print(f"\n{folder / plot['curves']} is an earlier evaluation's: this one had no history to draw")
    save_figures(folder, figures, shown)
    why = "pass --explain to draw it for this one" if results["top_confusions"] else "this one has no mistakes"
    remove_stale(folder, [plot["mistakes"], plot["explained"]], figures, why)


def save_figures(folder, figures, shown):
    """Draw, write and close each figure ({file name: drawing function}); print where they went. Each
    PNG records what it shows (shown: {file name: words}, as the PNG's Source), so that replacing a
    file that showed something else (another checkpoint, split or set of images) is said."""
    check_plots_are_ours(folder, figures)
    replaced = [name for name in figures if (folder / name).is_file() and png_source(folder / name) != shown[name]]
    for name, draw in figures.items():
        figure = draw()
        figure.tight_layout()
        with writing(folder / name, "--plot-dir"):
            figure.savefig(folder / name, dpi=120, metadata={"Source": shown[name]})
        plt.close(figure)
    print("\nplots: " + ", ".join(str(folder / name) for name in figures))
    if replaced:
        print(f"replaced {len(replaced)} plot(s) of another checkpoint, split or set of images: {', '.join(replaced)}")


def check_plots_are_ours(folder, names):
    """A photo of yours that happens to bear a plot's name is not ours to replace."""
    foreign = [name for name in names if (folder / name).exists() and not drawn_here(folder / name)]
    if foreign:
        raise data.UserError(
            f"{folder / foreign[0]} is not a plot of evaluate.py, and a plot would replace it; move it, or pass "
            f"another --plot-dir"
        )


def remove_stale(folder, names, figures, why):
    """Remove the plots among names that an earlier evaluation drew and this one did not: they would
    pass for this one's. A file evaluate.py did not draw stays."""
    stale = sorted(name for name in names if name not in figures and drawn_here(folder / name))
    for name in stale:
        (folder / name).unlink()
    if stale:
        print(f"removed {', '.join(stale)}, drawn by an earlier evaluation: {why}")


def drawn_here(path):
    """Whether a file is a plot of ours: evaluate.py's save_figures, train.py's --find-lr record that in it."""
    return (png_source(path) or "").startswith(("evaluate.py", "train.py"))


def png_source(path):
    """What an earlier PNG of ours shows (save_figures), or None (not ours, or unreadable)."""
    try:
        with Image.open(path) as image:
            return image.text.get("Source")
    except Exception:  # not a PNG, or broken: what it showed is unknown
        return None


def plot_curves(history, title):
    epochs = [r["epoch"] for r in history]
    best = best_record(history)["epoch"]
    figure, (loss_axis, acc_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for axis, key, label in ((loss_axis, "loss", "loss"), (acc_axis, "acc", "accuracy (%)")):
        scale = 100 if key == "acc" else 1
        axis.plot(epochs, [scale * r[f"train_{key}"] for r in history], "o-", ms=3, label="train")
        axis.plot(epochs, [scale * r[f"val_{key}"] for r in history], "o-", ms=3, label="validation")
        axis.axvline(best, color="gray", linestyle="--", label=f"best.safetensors (epoch {best})")
        axis.set(xlabel="epoch", ylabel=label, title=label.split(" ")[0])
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))  # no epoch 1.5
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(title)
    return figure


def plot_confusion(confusion, classes, title):
    normalised = confusion.double() / confusion.sum(1, keepdim=True).clamp(min=1)
    size = max(6, 0.6 * len(classes) + 2)
    figure, axis = plt.subplots(figsize=(size + 1, size))
    image = axis.imshow(normalised.numpy(), cmap="Blues", vmin=0, vmax=1)
    axis.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    axis.set_yticks(range(len(classes)), classes)
    axis.set(xlabel="predicted", ylabel="true", title=f"confusion matrix (each row sums to 1)\n{title}")
    if len(classes) <= 20:
        for i in range(len(classes)):
            for j in range(len(classes)):
                value = normalised[i, j].item()
                color = "white" if value > 0.5 else "black"
                axis.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8, color=color)
    figure.colorbar(image, ax=axis, fraction=0.046)
    return figure


def plot_per_class(per_class, classes, title):
    groups = data.group_of_classes(classes)  # None: no colours and no legend
    group_of = {i: name for name, members in (groups or {}).items() for i in members}
    order = sorted(range(len(classes)), key=lambda i: -per_class[classes[i]])
    figure, axis = plt.subplots(figsize=(max(6, 0.7 * len(classes) + 2), 4))
    colors = [GROUP_COLORS.get(group_of.get(i), "tab:gray") for i in order]
    bars = axis.bar([classes[i] for i in order], [100 * per_class[classes[i]] for i in order], color=colors)
    axis.bar_label(bars, fmt="%.1f", fontsize=8)
    for name in groups or ():
        axis.bar(0, 0, color=GROUP_COLORS.get(name, "tab:gray"), label=name)  # legend entries
    axis.set(ylabel="accuracy (%)", ylim=(0, 105), title=f"per-class accuracy\n{title}")
    axis.tick_params(axis="x", rotation=45)
    if groups:
        axis.legend(loc="upper right")
    return figure


def plot_calibration(report, title):
    """Reliability diagrams: each confidence bin's accuracy against its confidence, the count of its
    images on its bar; at T = 1 and, beside it, at the fitted temperature."""
    panels = [report["raw"]] + ([report["calibrated"]] if report["calibrated"] else [])
    figure, axes = plt.subplots(1, len(panels), figsize=(max(8, 5.5 * len(panels)), 5.3), squeeze=False)
    width = 1 / CALIBRATION_BINS
    centres = [(i + 0.5) * width for i in range(CALIBRATION_BINS)]
    for axis, scores in zip(axes[0], panels):
        bins = scores["bins"]
        axis.bar(centres, bins["accuracy"], width=width * 0.9, color="tab:blue", label="accuracy of the bin")
        axis.plot([0, 1], [0, 1], color="0.5", linestyle="--", label="perfect calibration")
        filled = [(x, confidence) for x, confidence, count in zip(centres, bins["confidence"], bins["count"]) if count]
        axis.plot(*zip(*filled), "o", color="tab:red", markersize=3, label="mean confidence")  # empty bins: none
        for x, accuracy, count in zip(centres, bins["accuracy"], bins["count"]):
            if count:
                axis.text(x, accuracy + 0.01, str(count), ha="center", va="bottom", fontsize=6, rotation=90)
        which = "T = 1 (raw)" if scores["temperature"] == 1 else f"T = {scores['temperature']:.3f}"
        axis.set(xlim=(0, 1), ylim=(0, 1.1), xlabel="confidence (top probability)", ylabel="accuracy")
        axis.set_title(f"{which}: ECE {scores['ece']:.4f}, NLL {scores['nll']:.3f}, Brier {scores['brier']:.3f}")
        axis.legend(loc="upper left", fontsize=8)
    figure.suptitle(f"reliability ({CALIBRATION_BINS} confidence bins; the number on a bar is its images)\n{title}")
    return figure


def show(axis, image, title, heat=None):
    """One image of a grid (uint8 [3, H, W]), with a title under it and, given, a heat map [H, W] in
    [0, 1] over it; an empty cell when image is None."""
    axis.axis("off")
    if image is not None:
        axis.imshow(image.permute(1, 2, 0).numpy(), interpolation="nearest" if image.shape[-1] <= 64 else "antialiased")
        if heat is not None:
            axis.imshow(heat.numpy(), cmap="jet", alpha=0.45, vmin=0, vmax=1, interpolation="bilinear")
        axis.set_title(title, fontsize=8)


def mistake_rows(labels, probabilities, confusions, classes):
    """mistakes.png's rows, one per most confused pair: (true class, predicted class, the indices of its
    images predicted wrongly with the highest confidence)."""
    rows = []
    for pair in confusions[:MISTAKE_PAIRS]:
        true, predicted = classes.index(pair["true"]), classes.index(pair["pred"])
        wrong = ((labels == true) & (probabilities.argmax(1) == predicted)).nonzero().flatten()
        most_confident = wrong[probabilities[wrong, predicted].argsort(descending=True)][:MISTAKES_PER_PAIR]
        rows.append((true, predicted, most_confident.tolist()))
    return rows


def mistake_label(true, predicted, probability, classes):
    return f"{classes[true]} -> {classes[predicted]}\n{probability:.0%}"


def plot_mistakes(images, probabilities, rows, classes, title):
    figure, axes = plt.subplots(len(rows), MISTAKES_PER_PAIR, figsize=(1.9 * MISTAKES_PER_PAIR, 2.2 * len(rows) + 0.6))
    for row, (true, predicted, wrong) in zip(axes.reshape(len(rows), -1), rows):
        for axis, i in itertools.zip_longest(row, wrong):
            label = None if i is None else mistake_label(true, predicted, probabilities[i, predicted], classes)
            show(axis, None if i is None else images[i], label)
    figure.suptitle(f"most confident mistakes of the most confused pairs (true -> predicted, raw probability)\n{title}")
    return figure


def plot_explained(images, maps, probabilities, rows, classes, title):
    """mistakes.png's images, each followed by its Grad-CAM map for the predicted class and for the
    true one (images [M, 3, c, c] and maps [2, M, c, c]: the mistakes in row order, as the network saw them)."""
    columns = 3 * MISTAKES_PER_PAIR
    figure, axes = plt.subplots(len(rows), columns, figsize=(1.3 * columns, 1.9 * len(rows) + 0.8), squeeze=False)
    mistakes = iter(range(len(images)))
    for row, (true, predicted, wrong) in zip(axes, rows):
        for cells, i in itertools.zip_longest(zip(*[iter(row)] * 3), wrong):
            if i is None:
                [axis.axis("off") for axis in cells]
                continue
            j = next(mistakes)
            show(cells[0], images[j], mistake_label(true, predicted, probabilities[i, predicted], classes))
            for axis, heat, name in ((cells[1], maps[0, j], classes[predicted]), (cells[2], maps[1, j], classes[true])):
                show(axis, images[j], f"where: {name}", heat)
    figure.suptitle(
        f"where the network looked (Grad-CAM, last stage): each mistake (raw probability), then its map for the "
        f"predicted class, then for the true one; red = most evidence\n{title}"
    )
    return figure


def plot_sheet(images, names, probabilities, classes, title, maps=None):
    """A contact sheet: each image with its predicted class and probability, and its file name; with
    maps ([N, H, W]), its Grad-CAM map for the predicted class over it."""
    rows = -(-len(images) // SHEET_COLUMNS)  # a last, short sheet is no taller than its images need
    figure, axes = plt.subplots(rows, SHEET_COLUMNS, figsize=(1.9 * SHEET_COLUMNS, 2.3 * rows + 0.5), squeeze=False)
    maps = [None] * len(images) if maps is None else maps
    for axis, image, name, p, heat in itertools.zip_longest(axes.flatten(), images, names, probabilities, maps):
        label = None if p is None else f"{classes[p.argmax()]} {p.max():.0%}\n{shorten(name)}"
        show(axis, image, label, heat)
    figure.suptitle(title)
    return figure


def printable(text):
    """text, with the bytes of a file or folder name of other bytes than UTF-8 (an old zip's) escaped:
    fonts and PNG text cannot hold Python's stand-ins for them."""
    return text.encode(errors="surrogateescape").decode(errors="backslashreplace")


def shorten(name, width=22):
    return name if len(name) <= width else "..." + name[-width + 3 :]


# ---------------------------------------------------------------------------------- calibration


def fit_temperature(logits, labels):
    """The temperature T minimising the negative log-likelihood of softmax(logits / T) (Guo et al.
    2017): one number for all classes, so it never changes the argmax. A golden-section search on
    log T within TEMPERATURE_RANGE (the NLL is convex in 1/T, so it has one minimum there)."""
    logits, labels = logits.double().cpu(), labels.cpu()

    def nll(log_temperature):
        return F.cross_entropy(logits / math.exp(log_temperature), labels).item()

    low, high = map(math.log, TEMPERATURE_RANGE)
    shrink = (math.sqrt(5) - 1) / 2
    for _ in range(60):  # each step keeps 0.618 of the interval: 60 leave 3e-13 of it
        left, right = high - shrink * (high - low), low + shrink * (high - low)
        if nll(left) < nll(right):
            high = right
        else:
            low = left
    return math.exp((low + high) / 2)


def calibration(logits, labels, temperature=1.0):
    """How far softmax(logits / temperature) is from the frequencies it claims: the expected
    calibration error over CALIBRATION_BINS equal-width confidence bins (the share of images in a
    bin x |its accuracy - its mean confidence|, summed), the negative log-likelihood, the Brier score
    (squared distance to the one-hot label, summed over classes, averaged), and each bin's accuracy,
    mean confidence and count for the reliability diagram."""
    logits, labels = logits.double().cpu() / temperature, labels.cpu()
    probabilities = logits.softmax(1)
    confidence, predicted = probabilities.max(1)
    bins = (confidence * CALIBRATION_BINS).ceil().long().clamp(1, CALIBRATION_BINS) - 1  # (i/15, (i+1)/15]
    counts = torch.zeros(CALIBRATION_BINS, dtype=torch.float64).index_add_(0, bins, torch.ones_like(confidence))
    hits = torch.zeros_like(counts).index_add_(0, bins, (predicted == labels).double())
    confidences = torch.zeros_like(counts).index_add_(0, bins, confidence)
    accuracy, mean_confidence = hits / counts.clamp(min=1), confidences / counts.clamp(min=1)
    one_hot = F.one_hot(labels, logits.shape[1]).double()
    return dict(
        temperature=temperature,
        ece=((counts / len(labels)) * (accuracy - mean_confidence).abs()).sum().item(),
        nll=F.cross_entropy(logits, labels).item(),
        brier=(probabilities - one_hot).pow(2).sum(1).mean().item(),
        bins=dict(accuracy=accuracy.tolist(), confidence=mean_confidence.tolist(), count=counts.long().tolist()),
    )


def calibration_report(logits, labels, metadata):
    temperature = metadata.get("temperature")
    raw = calibration(logits, labels)
    calibrated = None if temperature is None else calibration(logits, labels, temperature)
    return dict(raw=raw, calibrated=calibrated, caveat=calibration_caveat(metadata))


def calibration_caveat(metadata):
    """A sentence when the checkpoint's temperature is not to be trusted, else '': fitted on fewer than
    FEW_FOR_CALIBRATION images, or at an end of TEMPERATURE_RANGE (the split's NLL has no minimum inside)."""
    images = metadata.get("calibration", {}).get("images", FEW_FOR_CALIBRATION)
    temperature = metadata.get("temperature", 1.0)
    if images < FEW_FOR_CALIBRATION:
        why = f"fitted on only {images} validation images, too few to trust"
    elif any(math.isclose(temperature, end, rel_tol=1e-6) for end in TEMPERATURE_RANGE):
        why = f"stopped at {temperature:g}, an end of the range searched: its validation split had no better T"
    else:
        return ""
    return (
        f"T was {why}: check it on a test/ folder of your own; --predict --no-calibration gives the raw probabilities"
    )


# ---------------------------------------------------------------------------------- --predict


def image_files(paths):
    """The image files the --predict paths name, each once however often they are named: files (read
    when PIL reads them, whatever their extension: photo.jfif), and the images in folders (searched
    through, as data.find_images lists training folders)."""
    files, seen, listed = [], data.Seen(), set()
    # a file named outright is listed by that name, not by a link to it met in a folder, before or after
    seen.files = {data.file_identity(path) for path in map(Path, paths) if not path.is_dir()}
    for path in map(Path, paths):
        if not path.exists() and not path.is_symlink():
            raise data.UserError(f"--predict {path} does not exist; pass image files or folders of them")
        if path.is_dir():  # an earlier --predict's contact sheets, drawn into this folder, are not photos to classify
            skipped = seen.links + len(seen.special)
            images = [image for image in map(Path, data.find_images(path, seen)) if not sheet_of_ours(image)]
            if not images and seen.links + len(seen.special) == skipped:
                kinds = ", ".join(data.IMAGE_EXTENSIONS[:3])
                raise data.UserError(f"--predict {path}: no images there ({kinds}, ...: see data.IMAGE_EXTENSIONS)")
        elif data.special_file(path):  # a FIFO, socket or device: skipped and named, as in a folder
            seen.special.setdefault(data.file_identity(path), str(path))
            images = []
        else:  # a file, a broken link or a loop, read (or named as unreadable) whatever its name
            named = data.file_identity(path)
            images = [] if named in listed else [path]
            listed.add(named)
            for passed in (seen.others, seen.hidden):  # named outright: read, not counted as passed over
                passed.pop(named, None)
            seen.links += not images
        files += images
    seen.report("--predict")
    if not files:
        raise data.UserError("--predict: none of the paths named is an image file or holds one; pass image files "
                             "or folders of them")  # fmt: skip
    return files


def classify(args):
    """--predict: the checkpoint's top classes for each image, printed, as contact sheets and in a CSV."""
    model, metadata = load_checkpoint(args.checkpoint)
    classes = metadata["classes"]
    if args.top_k and args.top_k > len(classes):
        raise data.UserError(f"--top-k {args.top_k} asks for more than the checkpoint's {len(classes)} classes; "
                             f"pass at most {len(classes)}")  # fmt: skip
    folders = output_folders(args, metadata)
    files = image_files(args.predict)
    if not args.no_plots:
        check_plots_are_ours(plot_folder(args), sheet_names(args, len(files)))
    side = stored_side(metadata)
    data.check_memory(len(files), side, advice="pass fewer images at a time")
    # labels: each file's own index, which tells the ones that could be read
    # every unreadable file named: no manifest lists them, as a run's does
    images, kept = data.decode(list(map(str, files)), torch.arange(len(files)), torch.arange(len(files)), side, None)
    files = [files[i] for i in kept.tolist()]
    create(folders)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    temperature = 1.0 if args.no_calibration else metadata.get("temperature", 1.0)
    probabilities = (predict(model, images, metadata, args.batch_size, args.tta, device) / temperature).softmax(1)
    top = probabilities.topk(min(args.top_k or TOP_K, len(classes)))  # a 2-class checkpoint: 2 by default
    ranked = [[(classes[c], p) for p, c in zip(values.tolist(), indices.tolist())] for values, indices in zip(*top)]
    tta = ", each averaged with its mirror (--tta)" if args.tta else ""
    print(f"{args.checkpoint}: {len(files)} image(s); {metadata.get('preprocessing', 'stored 32x32')}{tta}")
    if args.no_calibration:
        print("probabilities: raw (--no-calibration), softmax of the logits")
    elif "temperature" in metadata:
        print(f"probabilities: calibrated, softmax of logits / {temperature:.3f} (the temperature fitted on the run's "
              f"validation split); --no-calibration shows the raw ones")  # fmt: skip
        if caveat := calibration_caveat(metadata):
            print(caveat)
    else:
        print("probabilities: raw; the checkpoint has no temperature (written before train.py fitted one)")
    width = max(len(str(path)) for path in files)
    for path, classes_and_p in zip(files, ranked):
        print(f"{str(path):<{width}}  " + "  ".join(f"{name} {p:6.1%}" for name, p in classes_and_p))
    if args.csv:
        with writing(args.csv, "--csv"):
            write_atomically(args.csv, lambda temporary: write_csv(temporary, files, ranked, top.indices.shape[1]))
        print(f"\npredictions: {args.csv}")
    if not args.no_plots:
        maps = None
        if args.explain:  # the predicted class's maps, over the images as the network saw them
            images, maps = explained(model, metadata, device, images, probabilities.argmax(1)[None], args.batch_size)
            maps = maps[0]
        write_sheets(args, files, images, probabilities, classes, maps)


def sheet_of_ours(path):
    return path.suffix.lower() == ".png" and "_predictions" in path.stem and drawn_here(path)


def write_csv(path, files, ranked, k):
    """--predict's table: each image's path, its most likely class and probability, and its top k. A
    file name of other bytes than UTF-8 is written as its own bytes."""
    with open(path, "w", newline="", errors="surrogateescape") as file:
        table = csv.writer(file)
        table.writerow(["path", "class", "probability", f"top_{k}"])
        for path, classes_and_p in zip(files, ranked):
            name, p = classes_and_p[0]
            table.writerow([path, name, f"{p:.4f}", "; ".join(f"{n} {q:.4f}" for n, q in classes_and_p)])


def sheet_names(args, count):
    """--predict's contact sheets for count images: <stem>_predictions.png, or _1, _2, ... when more than one."""
    sheets = math.ceil(count / (SHEET_COLUMNS * SHEET_ROWS))
    return [
        f"{Path(args.checkpoint).stem}_predictions{f'_{n}' if sheets > 1 else ''}.png" for n in range(1, sheets + 1)
    ]


def write_sheets(args, files, images, probabilities, classes, maps=None):
    per_sheet = SHEET_COLUMNS * SHEET_ROWS
    starts = range(0, len(files), per_sheet)
    figures, drawn = {}, [printable(name) for name in classes]
    for n, (name, start) in enumerate(zip(sheet_names(args, len(files)), starts), 1):
        part = slice(start, start + per_sheet)
        title = printable(f"predictions of {args.checkpoint} (sheet {n} of {len(starts)})")
        names = [printable(path.name) for path in files[part]]
        heat = None if maps is None else maps[part]
        figures[name] = functools.partial(plot_sheet, images[part], names, probabilities[part], drawn, title, heat)
    inputs = " ".join(str(Path(path).resolve()) for path in args.predict)
    shows = printable(f"evaluate.py {Path(args.checkpoint).resolve()} --predict {inputs}")
    folder = plot_folder(args)
    save_figures(folder, figures, dict.fromkeys(figures, shows))
    sheet = re.compile(rf"{re.escape(Path(args.checkpoint).stem)}_predictions(_\d+)?\.png")  # ours, not renamed
    earlier = [path.name for path in folder.glob("*.png") if sheet.fullmatch(path.name)]
    remove_stale(folder, earlier, figures, "sheets of an earlier --predict")


# ---------------------------------------------------------------------------------- where the model looked


def grad_cam(model, inputs, targets):
    """Grad-CAM (Selvaraju et al. 2017) on the last convolutional stage, for a whole batch: for each
    row of targets ([K, N] class indices), each image's map of the evidence for that class, the ReLU
    of its activations weighted by their mean gradient, upsampled to the input's size and scaled to
    a peak of 1: [K, N, H, W]. In eval mode the images are independent, so the gradient of the summed
    scores is each image's own."""
    activations = []
    hook = model.layer4.register_forward_hook(lambda module, args, output: activations.append(output))
    try:
        with torch.enable_grad():
            logits = model.eval()(inputs)
            maps = []
            for classes in targets.to(logits.device):
                (gradient,) = torch.autograd.grad(
                    logits.gather(1, classes[:, None]).sum(), activations[0], retain_graph=True
                )
                cam = F.relu((gradient.mean((2, 3), keepdim=True) * activations[0]).sum(1, keepdim=True))
                cam = F.interpolate(cam, size=inputs.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
                maps.append(cam / cam.flatten(1).amax(1).clamp(min=1e-12)[:, None, None])
    finally:
        hook.remove()
    return torch.stack(maps).detach().cpu()


def explained(model, metadata, device, images, targets, batch_size=None):
    """(the images as the network sees them: their centre crop, uint8; their Grad-CAM maps for the
    targets' classes at that size, [K, N, crop, crop]), in batches."""
    size, normalize = evaluation_input(metadata, device)
    batch_size = batch_size or default_batch(size)
    crop, side = metadata.get("eval_crop", stored_side(metadata)), images.shape[-1]
    start = (side - crop) // 2
    seen = images[..., start : start + crop, start : start + crop]
    maps = torch.cat(
        [grad_cam(model, normalize(images[i : i + batch_size].to(device)), targets[:, i : i + batch_size])
         for i in range(0, len(images), batch_size)], 1
    )  # fmt: skip
    maps = F.interpolate(maps.flatten(0, 1)[:, None], size=(crop, crop), mode="bilinear", align_corners=False)
    return seen, maps.view(len(targets), len(images), crop, crop)


# ---------------------------------------------------------------------------------- ONNX export


class PixelsToLogits(torch.nn.Module):
    """What --export-onnx exports: uint8 RGB images [N, 3, S, S] at the checkpoint's stored side S
    in, logits out; the evaluation's crop, resize and normalisation inside, so a user feeds pixels."""

    def __init__(self, model, metadata):
        super().__init__()
        self.model = model.eval()
        _, self.normalize = evaluation_input(metadata, "cpu")

    def forward(self, images):
        return self.model(self.normalize(images))


def onnx_properties(metadata):
    """The ONNX file's metadata_props: what a user needs to feed it and read its output."""
    side, size = stored_side(metadata), metadata.get("input_size", data.IMAGE_SIZE)
    crop = metadata.get("eval_crop", side)
    inside = f"centre {crop}x{crop} crop, " if crop < side else ""
    inside += "/ 255, " + (f"bilinear resize to {size}x{size}, " if size != crop else "") + "(x - mean) / std"
    return {
        "classes": json.dumps(metadata["classes"]),
        "mean": json.dumps(metadata["mean"]),
        "std": json.dumps(metadata["std"]),
        "input_size": str(side),
        "preprocessing": (
            f"input: uint8 RGB [N, 3, {side}, {side}], pixels 0-255: the image turned upright by its EXIF "
            f"orientation, its shorter side resized to {side} (bicubic; JPEGs decoded with PIL's draft mode at "
            f"the smallest scale of at least {side}x{side}, as in training) and the centre square kept. Inside "
            f"the graph: {inside}. Output: logits [N, "
            f"{len(metadata['classes'])}] in the order of classes; softmax(logits / temperature) gives calibrated "
            f"probabilities (temperature 1 when there is none)"
        ),
        "checkpoint": json.dumps({key: metadata.get(key) for key in ("arch", "stem", "epoch", "val_acc")}),
    } | ({"temperature": str(metadata["temperature"])} if "temperature" in metadata else {})


def onnx_packages():
    try:
        import onnx
        import onnxruntime
        import onnxscript  # noqa: F401  (torch.onnx.export's dynamo exporter needs it)
    except ImportError as error:
        raise data.UserError(f"--export-onnx needs {error.name}: {ONNX_PACKAGES}") from error
    return onnx, onnxruntime


def export_onnx(args):
    """--export-onnx: the checkpoint as one ONNX graph, checked with onnxruntime against PyTorch
    before it takes its name; a file that fails the check is not kept."""
    path = Path(args.export_onnx)
    if not path.name.lower().endswith(".onnx") or path.name.lower() == ".onnx":
        raise data.UserError(f"--export-onnx '{args.export_onnx}': give a file name ending in .onnx (model.onnx)")
    if path.is_dir() or args.export_onnx.endswith(("/", os.sep)):
        raise data.UserError(f"--export-onnx {path} names a folder; pass a file name, such as {path / 'model.onnx'}")
    if path.exists() and not args.overwrite:
        raise data.UserError(f"--export-onnx {path} exists; pass --overwrite to replace it, or another name")
    check_folder_can_be_made(path.parent, "--export-onnx", args.export_onnx)
    onnx, onnxruntime = onnx_packages()
    model, metadata = run_checkpoint(args.checkpoint)
    data.check_outside_splits(path, data_dirs(args, metadata), "--export-onnx")
    images, source = onnx_check_images(args, metadata)
    graph = PixelsToLogits(model, metadata).eval()

    def export_and_check(temporary):
        started = time.perf_counter()
        example = images[:2] if len(images) >= 2 else images.repeat(2, 1, 1, 1)
        batch = torch.export.Dim("batch")
        with contextlib.redirect_stdout(io.StringIO()):  # the exporter's progress lines, not ours to show
            torch.onnx.export(graph, (example,), dynamo=True, dynamic_shapes={"images": {0: batch}}).save(temporary)
        exported = onnx.load(temporary)
        properties = onnx_properties(metadata)
        onnx.helper.set_model_props(exported, properties)
        onnx.save(exported, temporary)
        seconds = time.perf_counter() - started
        checked = compare_with_pytorch(temporary, model, metadata, images, source, onnxruntime)  # raises: not kept
        print(f"{path}: exported in {seconds:.1f}s; {properties['preprocessing']}\n{checked}")

    with writing(path, "--export-onnx"):
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, export_and_check)


def onnx_check_images(args, metadata):
    """The images of the check: up to ONNX_CHECK_IMAGES of the split when --data-dir is given, else
    ONNX_SYNTHETIC random ones; and what they are, in words."""
    side = stored_side(metadata)
    if args.data_dir is None:
        generator = torch.Generator().manual_seed(0)
        return torch.randint(0, 256, (ONNX_SYNTHETIC, 3, side, side), dtype=torch.uint8, generator=generator), "random"
    images = load_split(args, metadata)[0][:ONNX_CHECK_IMAGES]
    return images, f"{args.data_dir} {args.split}"


def compare_with_pytorch(onnx_file, model, metadata, images, source, onnxruntime):
    """Both on the CPU, in the same batches: the largest logit difference and the top-1 agreement,
    and each one's speed; raises beyond ONNX_TOLERANCE or on another top-1 class (unless the two top
    classes of PyTorch are closer than the tolerance: a tie either may break)."""
    batch_size = default_batch(metadata.get("input_size", data.IMAGE_SIZE))
    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    started = time.perf_counter()
    batches = [
        session.run(None, {name: images[i : i + batch_size].numpy()})[0] for i in range(0, len(images), batch_size)
    ]
    onnx_seconds = time.perf_counter() - started
    started = time.perf_counter()
    expected = predict(model, images, metadata, batch_size, False, torch.device("cpu"))
    torch_seconds = time.perf_counter() - started
    found = torch.from_numpy(np.concatenate(batches))
    difference = (found - expected).abs().max().item()
    top2 = expected.topk(min(2, expected.shape[1])).values
    tie = (top2[:, 0] - top2[:, -1]) < ONNX_TOLERANCE
    disagree = ((found.argmax(1) != expected.argmax(1)) & ~tie).sum().item()
    line = (
        f"check, onnxruntime against PyTorch on the CPU, {len(images)} {source} images: largest logit difference "
        f"{difference:.2g} (tolerance {ONNX_TOLERANCE:g}), top-1 classes differ on {disagree}; onnxruntime "
        f"{len(images) / onnx_seconds:.0f} img/s, PyTorch (evaluate.py) {len(images) / torch_seconds:.0f} img/s"
    )
    if difference > ONNX_TOLERANCE or disagree:
        raise data.UserError(
            f"the exported graph does not match PyTorch: {line}; nothing was written. Try another version of torch "
            f"or onnxruntime, or raise ONNX_TOLERANCE in evaluate.py if such a difference is acceptable to you"
        )
    return line


# ---------------------------------------------------------------------------------- flags


# The flags: (flag, argparse's settings, help). data.path_flag refuses an empty path.
# fmt: off
FLAGS = [
    ("checkpoint", dict(type=data.path_flag), "a .safetensors file written by train.py"),
    ("--data-dir", dict(type=data.path_flag), "CIFAR-10, or an image folder (default: the run's, as recorded)"),
    ("--split", dict(choices=["test", "val"]), "test/, or the run's validation split (test)"),
    ("--batch-size", dict(type=bounded(int, 1)), f"images per pass, >= 1 ({BATCH_PIXELS // 32**2} at 32x32, as many "
     "pixels at larger inputs: 20 at 224)"),
    ("--cache-dir", dict(type=data.path_flag), "where train.py decoded the image folders; none: decode (the run's)"),
    ("--tta", dict(action="store_true"), "average each image's logits with its mirror's (off)"),
    ("--json", dict(type=data.path_flag), "also write the results to this JSON file (off)"),
    ("--plot-dir", dict(type=data.path_flag), "where the PNGs go (default: the checkpoint's folder)"),
    ("--no-plots", dict(action="store_true"), "write no PNGs (off)"),
    ("--skip-data-check", dict(action="store_true"), "--split val on a folder that is not the run's data: evaluate "
     "anyway, said in the report (off)"),
    ("--predict", dict(type=data.path_flag, nargs="+", metavar="PATH"), "classify these images or folders of them"),
    ("--csv", dict(type=data.path_flag), "--predict: also write the predictions to this CSV file (off)"),
    ("--top-k", dict(type=bounded(int, 1)), "--predict: classes shown per image (3)"),
    ("--no-calibration", dict(action="store_true"), "--predict: raw probabilities, not divided by the run's T (off)"),
    ("--explain", dict(action="store_true"), "Grad-CAM heat maps: <stem>_<split>_explained.png of the mistakes; "
     "with --predict, on the sheets (off)"),
    ("--export-onnx", dict(metavar="PATH"), "write the network as ONNX (uint8 pixels in, logits out) and check it"),
    ("--overwrite", dict(action="store_true"), "replace a file of yours at --export-onnx, --json or --csv (off)"),
]
# the flags each refusal below names, those given
ONNX_PLAIN, ONNX_ALONE = ("--predict", "--tta", "--explain"), ("--json", "--plot-dir", "--no-plots", "--no-calibration")
ONNX_PICKS, PREDICT_NO_DATA = ("--split", "--cache-dir"), ("--data-dir", "--cache-dir", "--skip-data-check")
# Flags that would do nothing in the combination given: (refused when, the one line that says so).
REFUSALS = [
    (lambda a: exporting(a) and given(a, *ONNX_PLAIN),
     lambda a: f"--export-onnx exports the plain network; drop {given(a, *ONNX_PLAIN)}"),
    (lambda a: exporting(a) and given(a, *ONNX_ALONE),
     lambda a: f"--export-onnx writes the .onnx file and nothing else, the temperature in its metadata for the user "
               f"to apply or not; drop {given(a, *ONNX_ALONE)}"),
    (lambda a: exporting(a) and not a.data_dir and given(a, *ONNX_PICKS),
     lambda a: f"--export-onnx checks the file on random images unless --data-dir is given, and "
               f"{given(a, *ONNX_PICKS)} pick(s) among its images; pass --data-dir too (the run's own "
               f"folder for --split val), or drop them"),
    (lambda a: exporting(a) and a.batch_size,
     "--export-onnx checks the file in batches of its own choosing; drop --batch-size"),
    (lambda a: exporting(a) and a.skip_data_check,
     "--export-onnx checks the file on any images of --data-dir, the run's or not; drop --skip-data-check"),
    (lambda a: a.no_calibration and not a.predict,
     "--no-calibration goes with --predict; an evaluation reports both T = 1 and the fitted T"),
    (lambda a: a.explain and a.no_plots, "--explain draws heat maps, and --no-plots draws nothing; drop one of them"),
    (lambda a: a.overwrite and not (exporting(a) or a.json or a.csv),
     "--overwrite goes with --export-onnx, --json or --csv: a file of yours there; plots replace only plots"),
    (lambda a: a.csv and not a.predict, "--csv goes with --predict; for an evaluation's results pass --json"),
    (lambda a: a.json and a.predict, "--json goes with an evaluation; for --predict's results pass --csv"),
    (lambda a: a.top_k and not a.predict, "--top-k goes with --predict: the classes shown for each image"),
    (lambda a: a.split and a.predict,
     "--split chooses what an evaluation measures; --predict classifies the paths given: drop --split"),
    (lambda a: a.predict and given(a, *PREDICT_NO_DATA),
     lambda a: f"--predict classifies the paths given, no data folder; drop {given(a, *PREDICT_NO_DATA)}"),
    (lambda a: a.skip_data_check and a.split != "val",
     "--skip-data-check goes with --split val: it skips the check that the folder holds the run's data"),
    (lambda a: a.plot_dir and a.no_plots, "--plot-dir says where plots go, and --no-plots draws none; drop one"),
]
# fmt: on


def parse_args(argv=None):
    parser = data.parser_of(__doc__, FLAGS)
    args = parser.parse_args(argv)
    data.refuse(parser, args, REFUSALS)
    # --export-onnx checks the file on any of the run's images: the validation split where DIR has no test/
    root = Path(args.data_dir or "")
    validation = args.data_dir and ((root / "train").is_dir() or data.val_folder_in(root))
    args.split = args.split or ("val" if exporting(args) and validation and not (root / "test").is_dir() else "test")
    return args


def given(args, *flags):
    """Those of flags that are set, in words ('--a and --b'); '' when none is."""
    return " and ".join(flag for flag in flags if getattr(args, flag[2:].replace("-", "_")))


def exporting(args):
    return args.export_onnx is not None  # --export-onnx "" too: refused by export_onnx, not evaluated


# ---------------------------------------------------------------------------------- output paths


def plot_folder(args):
    return Path(args.plot_dir or Path(args.checkpoint).parent)


def output_folders(args, metadata):
    """(flag, path given, folder) for the JSON file and the plots. Checked before any work, so that a path that
    cannot be written, or lies among the images of the data evaluated or the run's, is refused at once; created
    once the inputs have loaded, so that bad input leaves nothing behind."""
    folders = []
    for flag, path in (("--json", args.json), ("--csv", args.csv)):
        if path and (Path(path).is_dir() or path.endswith(("/", os.sep))):  # Path("a.json/") is "a.json"
            raise data.UserError(f"{flag} {path} names a folder; pass a file name in it")
        kind = flag.removeprefix("--")
        # the name guards what the user has: a mistyped --json CKPT would replace the checkpoint
        if path and (Path(path).suffix.lower() != f".{kind}" or Path(path).name == "history.json"):
            raise data.UserError(f"{flag} {path}: pass a new .{kind} file name, such as results.{kind}")
        if path and Path(path).is_file() and not args.overwrite and not written_here(Path(path)):
            raise data.UserError(
                f"{flag} {path} exists and is not one evaluate.py wrote; pass --overwrite to replace it, or a new name"
            )
        if path:
            folders.append((flag, path, Path(path).parent))
    if not args.no_plots:
        folders.append(("--plot-dir", plot_folder(args), plot_folder(args)))
    for flag, given, folder in folders:
        check_folder_can_be_made(folder, flag, given)
        data.check_outside_splits(given, data_dirs(args, metadata), flag)
    return folders


def data_dirs(args, metadata):
    """The data evaluated (none with --predict) and the run's own: outputs stay out of their split folders."""
    return [args.data_dir, metadata.get("config", {}).get("data_dir")]


def results_in(path):
    """(checkpoint, split, tta) of the results a --json file holds; None for no file, or another."""
    try:
        earlier = json.loads(Path(path).read_text())
        return earlier["checkpoint"], earlier["split"], bool(earlier.get("tta"))
    except (OSError, ValueError, TypeError, KeyError):
        return None


def written_here(path):
    """Whether a --json or --csv file is one evaluate.py wrote (rewritten without a word, as its plots)."""
    try:
        if path.suffix.lower() == ".json":
            return {"checkpoint", "num_samples"} <= set(json.loads(path.read_text()))
        return path.read_text(errors="replace").startswith("path,class,probability,top_")
    except (OSError, ValueError, TypeError):
        return False


def create(folders):
    for flag, _, folder in folders:
        with writing(folder, flag):
            folder.mkdir(parents=True, exist_ok=True)


@contextlib.contextmanager
def writing(path, flag):
    """A write that fails (disk full, permissions changed) becomes one error line, not a traceback."""
    try:
        yield
    except OSError as error:
        raise data.UserError(
            f"could not write {path} ({error}); check the free space and permissions, or pass another {flag}"
        ) from error


if __name__ == "__main__":
    main()
