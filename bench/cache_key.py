"""The cache's cost on a second run: listing an image folder, hashing its key (every image's path and
file_state: size, mtime, inode and change time) and opening the cache, in rounds.

    python bench/cache_key.py DIR [--rounds 3]

DIR holds train/<class>/ (the shared CIFAR-10 JPEGs: 50,000 images). The first round builds the cache
in a temporary --cache-dir (its time is decoding); the rounds after it are what every later run pays.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_dir")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    data.LOG = lambda line: None  # the table alone
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        for round_ in range(args.rounds + 1):
            started = time.perf_counter()
            items, _, _ = data.list_images(args.data_dir, "train")
            listed = time.perf_counter()
            data.cache_folder(items, data.IMAGE_SIZE, Path(args.data_dir) / "train", cache)
            keyed = time.perf_counter()
            data.load_images(args.data_dir, "train", cache_dir=cache)
            rows.append((round_, len(items), listed - started, keyed - listed, time.perf_counter() - keyed))
    print(f"{args.data_dir}/train, side {data.IMAGE_SIZE}, cache version {data.CACHE_VERSION}\n")
    print("| round | images | listing | key | load_images (listing, key, open) |\n|---|---|---|---|---|")
    for round_, count, listing, key, load in rows:
        name = "build" if round_ == 0 else str(round_)
        print(f"| {name} | {count} | {listing:.2f} s | {key:.2f} s | {load:.2f} s |")


if __name__ == "__main__":
    main()
