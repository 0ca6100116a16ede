"""The training controls of train.py, measured on the cases they exist for (bench/accuracy.md).

    python bench/controls.py --data-dir DIR --runs-dir bench-controls          # train what is missing, report
    python bench/controls.py --data-dir DIR --runs-dir bench-controls --only small_base small_mixup
    python bench/controls.py --data-dir DIR --runs-dir bench-controls --report-only

DIR is the shared CIFAR-10 JPEG training set, unpacked (DIR/train/<class>/). No ImageNet weights
can be downloaded here, and a short run on all of CIFAR-10 shows nothing of what mixup, CutMix or
a policy do, so the script builds three cases from DIR, as folders of links in --runs-dir:

- small: CIFAR-10 cut to 100 training images a class (train/), validated on 300 others a class
  (val/), from scratch, for many epochs: where regularisers matter. The regularisers (mixup,
  CutMix, the policies) with 2 seeds, the rest with one.
- transfer (a proxy for fine-tuning ImageNet weights): a network trained from scratch on the
  8 classes other than cat and dog (pre8), then fine-tuned on cat and dog (250 training images a
  class, 1,000 validation images a class) with --weights pointing at pre8's checkpoint.
- find-lr: the lr range test on DIR from scratch (the settings of bench/accuracy.py, whose
  measured best lr is 0.2) and on the transfer case.

Each run is `train.py` with the flags below; its line reports the validation accuracy at the epoch
of the lowest validation loss (the one best.safetensors holds) and at the last epoch, from the
run's history.json. A run whose folder has a history.json of all its epochs is not trained again.
"""

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = [None]  # --data-dir, shown as DIR in the report
FAST = ["--stem", "imagenet", "--input-size", "32"]  # the CPU's fast setting (bench/speed.md)
SEEDS = (0, 1)
ONE_SEED = ("mixup_cutmix", "accum4", "clip1")
SMALL = [*FAST, "--weights", "none", "--epochs", "60", "--batch-size", "64", "--lr", "0.1"]
SMALL_RUNS = {
    "base": [],
    "mixup": ["--mixup", "0.2"],
    "cutmix": ["--cutmix", "1.0"],
    "mixup_cutmix": ["--mixup", "0.2", "--cutmix", "1.0"],  # torchvision's reference recipe's alphas
    "ta_wide": ["--auto-augment", "ta_wide"],
    "ra": ["--auto-augment", "ra"],
    "accum4": ["--batch-size", "16", "--grad-accum-steps", "4"],  # effective 64, as base
    "clip1": ["--clip-grad-norm", "1.0"],
}
PRETRAIN = [*FAST, "--weights", "none", "--epochs", "8"]
FINE_TUNE = [*FAST, "--epochs", "15", "--batch-size", "32"]
FINE_TUNE_LR = 0.0125  # the default recipe's 0.05 at batch 128, scaled to 32
TRANSFER_RUNS = {
    "full": ["--lr", str(FINE_TUNE_LR)],
    "freeze1": ["--lr", str(FINE_TUNE_LR), "--freeze-epochs", "1"],
    "backbone01": ["--lr", str(FINE_TUNE_LR), "--backbone-lr-mult", "0.1"],
    "scratch": ["--lr", "0.05", "--weights", "none"],  # the from-scratch 0.2 at batch 128, scaled to 32
    "suggested": ["--lr", "0.0201"],  # what findlr_transfer suggested (bench/accuracy.md), tried
}


def link_folder(source, target, counts):
    """target/<part>/<class>/: links to consecutive images of source/train/<class>/, counts: {part: {class: n}}."""
    if target.exists():
        return target
    for name in sorted({name for per_class in counts.values() for name in per_class}):
        images = sorted((source / "train" / name).iterdir())
        start = 0
        for part, per_class in counts.items():
            if name in per_class:
                (target / part / name).mkdir(parents=True)
                for path in images[start : start + per_class[name]]:
                    (target / part / name / path.name).symlink_to(path.resolve())
                start += per_class[name]
    return target


def runs(data_dir, runs_dir):
    """{name: (flags, what the run is)}: every run of the three cases, in the order they are trained."""
    classes = sorted(path.name for path in (data_dir / "train").iterdir())
    others = [name for name in classes if name not in ("cat", "dog")]
    small = link_folder(data_dir, runs_dir / "data-small", {"train": dict.fromkeys(classes, 100),
                                                             "val": dict.fromkeys(classes, 300)})  # fmt: skip
    eight = link_folder(data_dir, runs_dir / "data-pre8", {"train": dict.fromkeys(others, 2500)})
    catdog = link_folder(data_dir, runs_dir / "data-catdog", {"train": dict.fromkeys(("cat", "dog"), 250),
                                                               "val": dict.fromkeys(("cat", "dog"), 1000)})  # fmt: skip
    pre8 = runs_dir / "pre8" / "best.safetensors"
    table = {"pre8": (["--data-dir", str(eight), *PRETRAIN], "8 classes, from scratch")}
    for name, flags in TRANSFER_RUNS.items():
        weights = [] if "--weights" in flags else ["--weights", str(pre8)]
        for seed in SEEDS:
            table[f"transfer_{name}_s{seed}"] = (["--data-dir", str(catdog), *FINE_TUNE, *weights, *flags,
                                                  "--seed", str(seed)], "cat/dog")  # fmt: skip
    suggested = {name: table.pop(name) for name in list(table) if name.startswith("transfer_suggested")}
    table["findlr_cifar"] = (["--data-dir", str(data_dir), *FAST, "--weights", "none", "--find-lr"], "CIFAR-10")
    find_lr = [*FAST, "--batch-size", "32", "--weights", str(pre8), "--find-lr"]  # FINE_TUNE but its --epochs
    table["findlr_transfer"] = (["--data-dir", str(catdog), *find_lr], "cat/dog")
    table |= suggested  # after the test that suggested it
    for name, flags in SMALL_RUNS.items():
        for seed in SEEDS[:1] if name in ONE_SEED else SEEDS:
            table[f"small_{name}_s{seed}"] = (["--data-dir", str(small), *SMALL, *flags, "--seed", str(seed)], "small")
    return table


def train(name, flags, runs_dir):
    out = runs_dir / name
    if (out / "done.txt").exists():
        return
    command = [sys.executable, str(ROOT / "train.py"), *flags, "--output-dir", str(out)]
    if "--find-lr" not in flags:
        command.append("--overwrite")  # a run left half-trained by an earlier call starts again
    print(f"training {name}: {' '.join(command[2:])}", file=sys.stderr, flush=True)
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "log.txt").write_text(result.stdout + result.stderr)
    if result.returncode:
        sys.exit(f"{name} failed:\n{result.stderr[-2000:]}")
    (out / "done.txt").write_text(" ".join(flags) + "\n")


def report_line(name, flags, runs_dir):
    out = runs_dir / name
    shown = " ".join(flags).replace(f"{runs_dir}/", "").replace(f"{DATA_DIR[0]}", "DIR")
    if "--find-lr" in flags:
        log = (out / "log.txt").read_text()
        suggested = re.search(r"suggested peak lr: (\S+)", log).group(1)
        lowest = re.search(r"lowest, (\S+), at lr (\S+)", log)
        found = f"suggested lr {suggested} (lowest smoothed loss {lowest.group(1)} at lr {lowest.group(2)})"
        return f"| {name} | `{shown}` | {found} | | |"
    history = json.loads((out / "history.json").read_text())
    best = min(history, key=lambda record: record["val_loss"])
    minutes = sum(record["seconds"] for record in history) / 60
    return (
        f"| {name} | `{shown}` | {best['val_acc']:.2%} (epoch {best['epoch']}) | {history[-1]['val_acc']:.2%} | "
        f"{minutes:.1f} |"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True, help="the CIFAR-10 JPEG folder, unpacked")
    parser.add_argument("--runs-dir", type=Path, default=Path("bench-controls"))
    parser.add_argument("--only", nargs="+", help="these runs only")
    parser.add_argument("--report-only", action="store_true", help="train nothing; report the finished runs")
    args = parser.parse_args()
    args.runs_dir = args.runs_dir.resolve()
    DATA_DIR[0] = str(args.data_dir.resolve())
    table = runs(args.data_dir.resolve(), args.runs_dir)
    chosen = args.only or list(table)
    if not args.report_only:
        for name in chosen:
            train(name, table[name][0], args.runs_dir)
    print("| run | flags | val acc at the lowest val loss | val acc, last epoch | minutes |")
    print("|---|---|---|---|---|")
    for name in chosen:
        if (args.runs_dir / name / "done.txt").exists():
            print(report_line(name, table[name][0], args.runs_dir))


if __name__ == "__main__":
    main()
