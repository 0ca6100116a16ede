"""Evaluate a checkpoint written by train.py: accuracy, per-class analysis, and the run's curves.

    python evaluate.py runs/<name>/best.safetensors                  # CIFAR-10 test set
    python evaluate.py runs/<name>/best.safetensors --split val      # the run's own validation split
    python evaluate.py CKPT --data-dir DIR --json results.json --tta

Prints overall and per-class accuracy, precision/recall/F1, the vehicles-vs-animals gap, the most
confused pairs and, from the history.json beside the checkpoint, an overfitting analysis. Writes
curves.png, confusion.png and per_class.png beside the checkpoint (or to --plot-dir).
"""

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import data  # noqa: E402
from model import group_index, load_checkpoint  # noqa: E402

TOP_CONFUSIONS = 5
GROUP_COLORS = {"vehicles": "tab:blue", "animals": "tab:orange"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a .safetensors file written by train.py")
    parser.add_argument("--data-dir", default="./data")
    parser.add_argument("--split", choices=["test", "val"], default="test")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--tta", action="store_true", help="average each image's logits with its mirror image's")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--plot-dir", help="where the PNGs go (default: the checkpoint's folder)")
    parser.add_argument("--no-plots", action="store_true")
    return parser.parse_args(argv)


def load_split(data_dir, split, metadata):
    """The images to evaluate on: the test split, or the exact validation split of the run."""
    images, labels, classes = data.load_images(data_dir, "train" if split == "val" else "test")
    if classes != metadata["classes"]:
        sys.exit(f"error: the checkpoint's classes {metadata['classes']} differ from those in {data_dir}: {classes}")
    if split == "val":
        _, val = data.train_val_indices(labels, metadata["val_fraction"], metadata["seed"])
        images, labels = images[val], labels[val]
    return images, labels


@torch.inference_mode()
def predict(model, images, metadata, batch_size, tta, device):
    """Logits for every image, in large batches; with tta, averaged with the mirrored image's."""
    model.eval().to(device, memory_format=torch.channels_last)
    logits = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size].to(device)
        batch = data.normalize(batch, metadata["mean"], metadata["std"], metadata.get("input_size", data.IMAGE_SIZE))
        out = model(batch)
        if tta:
            out = (out + model(batch.flip(3))) / 2
        logits.append(out.float().cpu())
    return torch.cat(logits)


# ---------------------------------------------------------------------------------- metrics


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


def overfitting(history):
    """The seed write-up's overfitting figures from a run's history (accuracy gaps in points)."""
    if not history:
        return None
    best = min(history, key=lambda r: r["val_loss"])
    last = history[-1]
    return {
        "best_epoch": best["epoch"],
        "val_loss_increase_pct": 100 * (last["val_loss"] - best["val_loss"]) / best["val_loss"],
        "train_val_acc_gap_best": 100 * (best["train_acc"] - best["val_acc"]),
        "train_val_acc_gap_last": 100 * (last["train_acc"] - last["val_acc"]),
        "loss_ratio_best": best["val_loss"] / best["train_loss"],
        "loss_ratio_last": last["val_loss"] / last["train_loss"],
    }


def read_history(checkpoint):
    path = Path(checkpoint).with_name("history.json")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------- report


def print_report(results, classes):
    print(f"{results['split']} split: {results['num_samples']} images")
    print(f"accuracy {results['accuracy']:.2%}   loss {results['loss']:.4f}\n")
    order = sorted(range(len(classes)), key=lambda i: -results["per_class"][classes[i]])
    marks = {order[0]: "best", order[1]: "best", order[2]: "best", order[-1]: "worst", order[-2]: "worst"}
    width = max(len(c) for c in classes)
    print(f"{'class':<{width}}  accuracy  precision  recall     F1")
    for i in order:
        name = classes[i]
        print(
            f"{name:<{width}}  {results['per_class'][name]:8.2%}  {results['per_class_precision'][name]:9.2%}"
            f"  {results['per_class_recall'][name]:6.2%}  {results['per_class_f1'][name]:6.2%}  {marks.get(i, '')}"
        )
    macro = {
        key: sum(results[key].values()) / len(classes)
        for key in ("per_class_precision", "per_class_recall", "per_class_f1")
    }
    print(
        f"{'macro':<{width}}  {'':8}  {macro['per_class_precision']:9.2%}  {macro['per_class_recall']:6.2%}"
        f"  {macro['per_class_f1']:6.2%}"
    )
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
        print(
            f"\nhistory: lowest validation loss at epoch {o['best_epoch']}; "
            f"validation loss rose {o['val_loss_increase_pct']:.1f}% from there to the last epoch\n"
            f"train-val accuracy gap: {o['train_val_acc_gap_best']:.2f} points at the best epoch, "
            f"{o['train_val_acc_gap_last']:.2f} at the last\n"
            f"val/train loss ratio: {o['loss_ratio_best']:.2f} at the best epoch, "
            f"{o['loss_ratio_last']:.2f} at the last"
        )


# ---------------------------------------------------------------------------------- plots


def plot_curves(history, path):
    epochs = [r["epoch"] for r in history]
    best = min(history, key=lambda r: r["val_loss"])["epoch"]
    figure, (loss_axis, acc_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for axis, key, label in ((loss_axis, "loss", "loss"), (acc_axis, "acc", "accuracy (%)")):
        scale = 100 if key == "acc" else 1
        axis.plot(epochs, [scale * r[f"train_{key}"] for r in history], "o-", ms=3, label="train")
        axis.plot(epochs, [scale * r[f"val_{key}"] for r in history], "o-", ms=3, label="validation")
        axis.axvline(best, color="gray", linestyle="--", label=f"lowest val loss (epoch {best})")
        axis.set(xlabel="epoch", ylabel=label, title=label.split(" ")[0])
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_confusion(confusion, classes, path):
    normalised = confusion.double() / confusion.sum(1, keepdim=True).clamp(min=1)
    size = max(6, 0.6 * len(classes) + 2)
    figure, axis = plt.subplots(figsize=(size + 1, size))
    image = axis.imshow(normalised.numpy(), cmap="Blues", vmin=0, vmax=1)
    axis.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    axis.set_yticks(range(len(classes)), classes)
    axis.set(xlabel="predicted", ylabel="true", title="confusion matrix (each row sums to 1)")
    if len(classes) <= 20:
        for i in range(len(classes)):
            for j in range(len(classes)):
                value = normalised[i, j].item()
                axis.text(
                    j,
                    i,
                    f"{value:.2f}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if value > 0.5 else "black",
                )
    figure.colorbar(image, ax=axis, fraction=0.046)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_per_class(per_class, classes, path):
    groups = data.group_of_classes(classes) or {"all": list(range(len(classes)))}
    group_of = {i: name for name, members in groups.items() for i in members}
    order = sorted(range(len(classes)), key=lambda i: -per_class[classes[i]])
    figure, axis = plt.subplots(figsize=(max(6, 0.7 * len(classes) + 2), 4))
    colors = [GROUP_COLORS.get(group_of[i], "tab:gray") for i in order]
    bars = axis.bar([classes[i] for i in order], [100 * per_class[classes[i]] for i in order], color=colors)
    axis.bar_label(bars, fmt="%.1f", fontsize=8)
    for name in groups:
        axis.bar(0, 0, color=GROUP_COLORS.get(name, "tab:gray"), label=name)  # legend entries
    axis.set(ylabel="accuracy (%)", ylim=(0, 105), title="per-class accuracy")
    axis.tick_params(axis="x", rotation=45)
    axis.legend(loc="upper right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None):
    args = parse_args(argv)
    model, metadata = load_checkpoint(args.checkpoint)
    classes = metadata["classes"]
    images, labels = load_split(args.data_dir, args.split, metadata)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    logits = predict(model, images, metadata, args.batch_size, args.tta, device)
    predictions = logits.argmax(1)
    confusion = confusion_matrix(labels, predictions, len(classes))
    precision, recall, f1 = precision_recall_f1(confusion)
    history = read_history(args.checkpoint)
    results = {
        "split": args.split,
        "num_samples": len(labels),
        "accuracy": (predictions == labels).double().mean().item(),
        "loss": F.cross_entropy(logits, labels).item(),
        "per_class": dict(zip(classes, recall.tolist())),
        "per_class_precision": dict(zip(classes, precision.tolist())),
        "per_class_recall": dict(zip(classes, recall.tolist())),
        "per_class_f1": dict(zip(classes, f1.tolist())),
        "confusion": confusion.tolist(),
        "groups": group_accuracies(recall, classes),
        "stage1_accuracy": stage1_accuracy(logits, labels, classes),
        "top_confusions": top_confusions(confusion, classes),
        "overfitting": overfitting(history),
        "tta": args.tta,
        "checkpoint": str(args.checkpoint),
    }
    print_report(results, classes)
    if not args.no_plots:
        plot_dir = Path(args.plot_dir or Path(args.checkpoint).parent)
        plot_dir.mkdir(parents=True, exist_ok=True)
        paths = [plot_dir / "confusion.png", plot_dir / "per_class.png"]
        plot_confusion(confusion, classes, paths[0])
        plot_per_class(results["per_class"], classes, paths[1])
        if history:
            paths.insert(0, plot_dir / "curves.png")
            plot_curves(history, paths[0])
        print("\nplots: " + ", ".join(str(p) for p in paths))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
        print(f"results: {args.json}")


if __name__ == "__main__":
    main()
