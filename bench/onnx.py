"""The ONNX export of evaluate.py, measured (bench/after_training.md).

    python bench/onnx.py RUN/best.safetensors --data-dir DIR               # 3 rounds, DIR's test/
    python bench/onnx.py RUN/best.safetensors --data-dir DIR --rounds 5 --split val

Each round is `evaluate.py CKPT --export-onnx FILE --data-dir DIR --split SPLIT` into a fresh
temporary folder, alone on the machine: the export's time, then its own check on up to 1,000 of
the split's images (evaluate.ONNX_CHECK_IMAGES), which runs onnxruntime and evaluate.py's PyTorch
path on the CPU in the same batches. The table holds what each round printed, and the medians.
"""

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRINTED = {  # what evaluate.py --export-onnx prints, as numbers
    "export_s": r"exported in ([\d.]+)s",
    "images": r"on the CPU, (\d+) ",
    "difference": r"largest logit difference ([\d.e+-]+)",
    "top1_differ": r"top-1 classes differ on (\d+)",
    "onnxruntime": r"onnxruntime (\d+) img/s",
    "pytorch": r"PyTorch \(evaluate.py\) (\d+) img/s",
}


def export_round(checkpoint, data_dir, split):
    with tempfile.TemporaryDirectory() as folder:  # evaluate.py runs in ROOT: the paths made absolute
        command = [sys.executable, "evaluate.py", str(Path(checkpoint).resolve()), "--export-onnx", f"{folder}/m.onnx"]
        command += ["--data-dir", str(Path(data_dir).resolve()), "--split", split]
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"the export failed: {result.stderr.strip().splitlines()[-1]}")
    return {key: float(re.search(pattern, result.stdout).group(1)) for key, pattern in PRINTED.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--split", default="test", choices=["test", "val"])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds: at least 1")
    rounds = [export_round(args.checkpoint, args.data_dir, args.split) for _ in range(args.rounds)]
    print(f"{args.checkpoint}, {args.split} split of {args.data_dir}, {args.rounds} round(s)\n")
    print("| round | export, s | images | largest logit difference | top-1 differ | onnxruntime img/s", end=" ")
    print("| PyTorch img/s |")
    print("|---|---|---|---|---|---|---|")
    for i, r in enumerate(rounds, 1):
        print(
            f"| {i} | {r['export_s']:.1f} | {r['images']:.0f} | {r['difference']:.2g} | {r['top1_differ']:.0f} | "
            f"{r['onnxruntime']:.0f} | {r['pytorch']:.0f} |"
        )
    median = {key: statistics.median(r[key] for r in rounds) for key in PRINTED}
    print(
        f"| median | {median['export_s']:.1f} | | {max(r['difference'] for r in rounds):.2g} (largest) | "
        f"{max(r['top1_differ'] for r in rounds):.0f} (most) | {median['onnxruntime']:.0f} | {median['pytorch']:.0f} |"
    )


if __name__ == "__main__":
    main()
