"""The decode-once cache and --data-on: written, then reused; rebuilt for a changed folder; never
taken half-written or broken; shared by runs that build it at once; the same history from memory,
from disk and without a cache."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, quick_args
from PIL import Image

import data
import evaluate
import train


@pytest.fixture
def folder(tmp_path):
    """DIR/train/{ant,bee}/ with 15 images each, 32x32 PNGs whose colour tells the class."""
    rng = np.random.default_rng(0)
    for name, colour in (("ant", (200, 30, 30)), ("bee", (30, 30, 200))):
        (tmp_path / "d" / "train" / name).mkdir(parents=True)
        for i in range(15):
            pixels = np.clip(np.array(colour) + rng.normal(0, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / "d" / "train" / name / f"{i:02d}.png")
    return tmp_path / "d"


def load(folder, cache, **options):
    splits, *_ = data.load_split(folder, 32, 0.2, 0, cache_dir=cache, **options)
    return splits


def caches(cache, built=True):
    """The cache folders in cache: complete ones, or (built=False) the temporary folders of builds."""
    return sorted(path.name for path in Path(cache).glob("*") if path.is_dir() and (".tmp-" in path.name) != built)


def test_the_cache_is_written_then_reused_with_the_same_images(folder, tmp_path, capsys):
    uncached = load(folder, None)
    first = load(folder, tmp_path / "cache")
    assert "decoded 30 images in" in capsys.readouterr().out and len(caches(tmp_path / "cache")) == 1
    second = load(folder, tmp_path / "cache")
    assert "30 images from the cache" in capsys.readouterr().out
    for part in ("train", "val"):
        assert torch.equal(first[part].images, uncached[part].images)
        assert torch.equal(second[part].labels, uncached[part].labels)
    manifest = json.loads((tmp_path / "cache" / caches(tmp_path / "cache")[0] / "manifest.json").read_text())
    assert (manifest["images"], manifest["side"], manifest["version"]) == (30, 32, data.CACHE_VERSION)


def test_a_folder_changed_after_caching_is_decoded_again(folder, tmp_path, capsys):
    load(folder, tmp_path / "cache")
    image = folder / "train" / "ant" / "00.png"
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(image)  # replaced: same name, same size
    os.utime(image, ns=(time.time_ns(), time.time_ns() + 10**9))
    capsys.readouterr()
    splits = load(folder, tmp_path / "cache")
    assert "decoded 30 images" in capsys.readouterr().out and len(caches(tmp_path / "cache")) == 2
    assert torch.equal(splits["train"].images, load(folder, None)["train"].images)


def test_a_cache_left_half_written_by_a_killed_build_is_never_used(folder, tmp_path, capsys):
    script = (
        "import sys, time; sys.path.insert(0, '.'); import data\n"
        "read = data.read_image\n"
        "data.read_image = lambda path, side: (time.sleep(0.2), read(path, side))[1]\n"
        "print('building', flush=True)\n"
        f"data.load_split({str(folder)!r}, 32, 0.2, 0, cache_dir={str(tmp_path / 'cache')!r})\n"
    )
    build = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE)
    assert build.stdout.readline() == b"building\n"
    time.sleep(2)  # some of the 30 images are written
    build.send_signal(signal.SIGKILL)
    build.wait()
    assert caches(tmp_path / "cache") == [] and len(caches(tmp_path / "cache", built=False)) == 1
    splits = load(folder, tmp_path / "cache")
    assert "decoded 30 images" in capsys.readouterr().out
    assert len(caches(tmp_path / "cache")) == 1 and caches(tmp_path / "cache", built=False) == []
    assert torch.equal(splits["train"].images, load(folder, None)["train"].images)


def test_a_truncated_cache_is_detected_and_rebuilt(folder, tmp_path, capsys):
    load(folder, tmp_path / "cache")
    images = tmp_path / "cache" / caches(tmp_path / "cache")[0] / "images.npy"
    images.write_bytes(images.read_bytes()[:5000])
    capsys.readouterr()
    splits = load(folder, tmp_path / "cache")
    printed = capsys.readouterr().out
    assert "is broken" in printed and "decoded 30 images" in printed
    assert torch.equal(splits["val"].images, load(folder, None)["val"].images)


def test_two_runs_building_the_same_cache_at_once_both_work(folder, tmp_path):
    script = (
        "import sys; sys.path.insert(0, '.'); import data\n"
        f"splits, *_ = data.load_split({str(folder)!r}, 32, 0.2, 0, cache_dir={str(tmp_path / 'cache')!r})\n"
        "print(int(splits['train'].images.sum()), len(splits['val']))\n"
    )
    runs = [subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True) for _ in "ab"]
    outputs = [run.communicate(timeout=120)[0] for run in runs]
    assert all(run.returncode == 0 for run in runs)
    sums = [output.splitlines()[-1] for output in outputs]
    assert sums[0] == sums[1] and sum("decoded 30 images" in output for output in outputs) == 1
    assert len(caches(tmp_path / "cache")) == 1 and caches(tmp_path / "cache", built=False) == []


def history(out):
    return [
        {k: v for k, v in record.items() if k != "seconds"} for record in json.loads((out / "history.json").read_text())
    ]


def test_cache_none_disk_and_device_train_the_same_history(folder, tmp_path):
    runs = {
        "none": ["--cache-dir", "none"],
        "device": ["--cache-dir", tmp_path / "cache", "--data-on", "device"],
        "disk": ["--cache-dir", tmp_path / "cache", "--data-on", "disk"],
    }
    for name, flags in runs.items():
        train.main(
            [*quick_args(folder, tmp_path / name, "--batch-size", "4", "--max-train-samples", "1000"), *map(str, flags)]
        )
    assert history(tmp_path / "none") == history(tmp_path / "device") == history(tmp_path / "disk")


def test_auto_reads_from_disk_when_the_images_do_not_fit_in_memory(folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data, "MEMORY_SHARE", 1e-12)
    train.main(
        [
            *quick_args(folder, tmp_path / "run", "--batch-size", "4", "--max-train-samples", "1000"),
            "--cache-dir",
            str(tmp_path / "cache"),
        ]
    )
    printed = capsys.readouterr().out
    assert "do not fit in memory; training reads them from the cache" in printed
    assert "read batch by batch from the cache on disk" in printed


def test_a_cache_dir_that_is_a_file_or_a_full_disk_costs_only_the_cache(folder, tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("not a folder")
    splits = load(folder, tmp_path / "file")
    assert "cannot be made" in capsys.readouterr().out and len(splits["train"]) == 24
    monkeypatch.setattr(data.shutil, "disk_usage", lambda path: type("usage", (), {"free": 1000})())
    splits = load(folder, tmp_path / "cache")
    printed = capsys.readouterr().out
    assert "needs 0.1 MiB and" in printed and "decoding into memory, without a cache" in printed
    assert len(splits["val"]) == 6 and caches(tmp_path / "cache") + caches(tmp_path / "cache", built=False) == []


def test_a_disk_too_full_for_the_cache_of_images_too_large_for_memory_is_refused_with_the_sizes(
    folder, tmp_path, monkeypatch
):
    monkeypatch.setattr(data, "MEMORY_SHARE", 1e-12)  # auto would read from disk
    monkeypatch.setattr(data.shutil, "disk_usage", lambda path: type("usage", (), {"free": 1000})())
    with pytest.raises(SystemExit) as refusal:
        train.main(
            [*quick_args(folder, tmp_path / "run", "--max-train-samples", "1000"), "--cache-dir", str(tmp_path / "c")]
        )
    message = str(refusal.value.code)
    assert "needs 0.1 MiB and" in message and "has 0.0 MiB free" in message and "--data-on disk reads" in message
    assert caches(tmp_path / "c") + caches(tmp_path / "c", built=False) == [] and not (tmp_path / "run").exists()


def test_data_on_disk_without_a_cache_is_one_error_line(folder, tmp_path):
    with pytest.raises(SystemExit) as refusal:
        train.main([*quick_args(folder, tmp_path / "run"), "--cache-dir", "none", "--data-on", "disk"])
    assert str(refusal.value.code) == "error: --data-on disk reads batches from the cache; drop --cache-dir none"
    subset = quick_args(folder, tmp_path / "run", "--max-train-samples", "10", "--batch-size", "4")
    with pytest.raises(SystemExit) as refusal:  # a subset is decoded into memory, without a cache
        train.main([*subset, "--cache-dir", str(tmp_path / "c"), "--data-on", "disk"])
    assert "its subset without one; pass --data-on auto or device" in str(refusal.value.code)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "file, content",
    [("images.npy", b""), ("readable.npy", b""), ("manifest.json", b"null"), ("manifest.json", b'{"images": 30}')],
)
def test_an_empty_or_garbled_cache_file_is_rebuilt(file, content, folder, tmp_path, capsys):
    load(folder, tmp_path / "cache")
    (tmp_path / "cache" / caches(tmp_path / "cache")[0] / file).write_bytes(content)
    capsys.readouterr()
    splits = load(folder, tmp_path / "cache")
    printed = capsys.readouterr().out
    assert "is broken" in printed and "decoded 30 images" in printed
    assert torch.equal(splits["train"].images, load(folder, None)["train"].images)


def test_a_disk_that_fills_while_building_costs_the_cache_and_leaves_nothing(folder, tmp_path, monkeypatch, capsys):
    def full(fd, offset, length):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(data.os, "posix_fallocate", full)
    splits = load(folder, tmp_path / "cache")
    assert "No space left on device" in capsys.readouterr().out and len(splits["train"]) == 24
    assert caches(tmp_path / "cache") + caches(tmp_path / "cache", built=False) == []


def test_a_killed_builds_leftover_is_removed_by_any_later_build(folder, tmp_path, capsys):
    leftover = tmp_path / "cache" / "other-train-32px-0123456789abcdef.tmp-99999"
    leftover.mkdir(parents=True)
    (leftover / "images.npy").write_bytes(bytes(1000))
    yours = tmp_path / "cache" / "photos-2024-32px-0123456789abcdef.tmp-1"  # a build's name, a user's files
    yours.mkdir()
    (yours / "precious.txt").write_text("mine")
    load(folder, tmp_path / "cache")
    assert not leftover.exists() and len(caches(tmp_path / "cache")) == 1
    assert (yours / "precious.txt").read_text() == "mine"  # removed with its folder before
    assert not (tmp_path / "cache" / "photos-2024-32px-0123456789abcdef.lock").exists()


def test_a_complete_cache_is_read_where_nothing_can_be_written(folder, tmp_path, monkeypatch, capsys):
    load(folder, tmp_path / "cache")

    def read_only(cache_dir):
        raise data.CacheUnavailable(f"--cache-dir {cache_dir} is not writable")

    monkeypatch.setattr(data, "prepare_cache_dir", read_only)  # a read-only mount: root here writes anyway
    capsys.readouterr()
    splits = load(folder, tmp_path / "cache", data_on="disk")
    assert "30 images from the cache" in capsys.readouterr().out and splits["train"].rows is not None
    with pytest.raises(data.UserError) as refused:  # none there yet: --data-on disk has nothing to read
        load(folder, tmp_path / "other", data_on="disk")
    assert str(refused.value).endswith(
        "pass a writable --cache-dir, or --data-on device to decode the images into memory"
    )


def test_other_data_is_refused_before_anything_is_decoded_or_cached(folder, tmp_path, monkeypatch):
    command = quick_args(
        folder, tmp_path / "run", "--batch-size", "4", "--max-train-samples", "1000", "--schedule", "constant"
    )
    train.main([*command, "--cache-dir", str(tmp_path / "cache")])
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(folder / "train" / "ant" / "new.png")
    monkeypatch.setattr(data, "read_image", lambda *args: pytest.fail("an image was decoded"))
    with pytest.raises(SystemExit) as refusal:
        train.main([*command, "--cache-dir", str(tmp_path / "cache"), "--resume", "--epochs", "3"])
    assert "is not the data this run was split from (ant: 16 images, the run had 15)" in str(refusal.value.code)
    assert len(caches(tmp_path / "cache")) == 1


def test_older_caches_of_a_folder_are_said_and_an_empty_cache_dir_is_refused(folder, tmp_path, capsys):
    load(folder, tmp_path / "cache")
    (folder / "train" / "bee" / "00.png").unlink()
    capsys.readouterr()
    load(folder, tmp_path / "cache")
    assert "1 older cache(s) of" in capsys.readouterr().out
    other = tmp_path / "elsewhere" / "d"  # another data set whose caches' names start the same: d-train-32px-
    shutil.copytree(folder, other)
    load(other, tmp_path / "cache")
    assert "older cache" not in capsys.readouterr().out
    for main in (train.main, evaluate.main):  # refused as the command line is read
        with pytest.raises(SystemExit):
            main(["x.safetensors"] * (main is evaluate.main) + ["--cache-dir", ""])
        assert "argument --cache-dir: is empty" in capsys.readouterr().err
