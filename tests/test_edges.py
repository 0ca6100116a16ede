"""Edge cases found by trying the scripts as a new user would: results that were silently wrong, files
that were lost, commands a user naturally types, and messages that did not say what to do."""

import csv
import json
import os
import shutil
import struct
import sys
import zlib
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import quick_args
from PIL import Image
from safetensors.torch import save_file
from test_reliability import fake_run_checkpoint, refused, short_run, two_classes, write_images

import data
import evaluate
import model
import train

# ---------------------------------------------------------------------------------- wrong results


def solid_bmps(folder, colours):
    """One 32x32 BMP per colour (a BMP's size is fixed by its shape: all the same size), each with
    the same modification time, as an archive restores them."""
    folder.mkdir(parents=True)
    for i, colour in enumerate(colours):
        Image.new("RGB", (32, 32), colour).save(folder / f"{i}.bmp")
        os.utime(folder / f"{i}.bmp", ns=(10**18, 10**18))


def test_images_swapped_with_their_sizes_and_mtimes_kept_are_decoded_again(tmp_path, capsys):
    root = tmp_path / "d"
    solid_bmps(root / "train" / "red", [(250, 0, 0), (240, 0, 0)])
    solid_bmps(root / "train" / "blue", [(0, 0, 250), (0, 0, 240)])
    cache = tmp_path / "cache"
    before, _, _ = data.load_images(root, "train", cache_dir=cache)
    again, _, _ = data.load_images(root, "train", cache_dir=cache)
    assert "from the cache" in capsys.readouterr().out and torch.equal(before, again)
    red, blue = root / "train" / "red" / "0.bmp", root / "train" / "blue" / "0.bmp"
    os.rename(red, tmp_path / "swap.bmp")  # mv, three times: the files keep their sizes and mtimes
    os.rename(blue, red)
    os.rename(tmp_path / "swap.bmp", blue)
    after, _, _ = data.load_images(root, "train", cache_dir=cache)
    assert "decoded 4 images" in capsys.readouterr().out
    assert torch.equal(after[0], before[2]) and torch.equal(after[2], before[0])  # the files' pixels, not the cache's


def test_a_finished_run_whose_lr_reached_0_points_to_its_weights_not_to_more_epochs():
    args = Namespace(patience=None, epochs=2, output_dir="my run")
    said = train.finished_run(args, [{"epoch": 1, "lr": 0.1}, {"epoch": 2, "lr": 0.0}], saved_epochs=2)
    assert said.endswith("Its lr is 0: --weights 'my run/best.safetensors' starts a new run from its weights")


def test_a_best_epoch_inside_the_freeze_is_said_to_be_the_heads_alone(tmp_path):
    args = Namespace(data_dir=str(tmp_path), cache_dir=None, freeze_epochs=2)
    history = [dict(epoch=e, val_loss=loss, val_acc=0.5) for e, loss in ((1, 0.9), (2, 0.5), (3, 0.7))]
    summary = train.final_summary(tmp_path, args, history, ["cat", "dog"]).splitlines()[0]
    assert summary.endswith("epoch 2, val loss 0.5000, val acc 50.00%, of the head alone (--freeze-epochs 2; no "
                            "later epoch had a lower loss)")  # fmt: skip
    args.freeze_epochs = 1
    assert train.final_summary(tmp_path, args, history, ["cat", "dog"]).splitlines()[0].endswith("acc 50.00%")


def test_the_best_epoch_is_one_at_the_input_size_after_small_epochs():
    history = [dict(epoch=1, val_loss=0.5, input_size=32), dict(epoch=2, val_loss=0.4, input_size=32)]
    history.append(dict(epoch=3, val_loss=0.8, input_size=64))  # the first at 64: its loss does not compare
    args = Namespace(patience=1, freeze_epochs=0, small_epochs=2, epochs=5)
    assert train.best_record(history)["epoch"] == 3 and not train.patience_ran_out(args, history)
    history.append(dict(epoch=4, val_loss=0.9, input_size=64))
    assert train.best_record(history)["epoch"] == 3 and train.patience_ran_out(args, history)
    assert train.best_record([dict(epoch=1, val_loss=0.3), *history[2:]])["epoch"] == 1  # a record older than sizes


@pytest.mark.parametrize("freeze, small", [(2, 0), (0, 2)])
def test_patience_never_ends_a_run_inside_its_freeze_or_small_epochs(freeze, small):
    rising = [{"epoch": n, "val_loss": float(n)} for n in range(1, 4)]  # the best is epoch 1, then worse
    args = Namespace(patience=1, freeze_epochs=freeze, small_epochs=small, epochs=5)
    assert not train.patience_ran_out(args, rising[:2])  # epoch 2: the head alone, or the small images: no stop
    assert train.finished_run(args, rising[:2], saved_epochs=5) is None  # resumed: it goes on
    assert train.patience_ran_out(args, rising)  # epoch 3 trained the whole network
    assert "--patience 1 stopped it" in train.finished_run(args, rising, saved_epochs=5)


@pytest.mark.parametrize(
    "patience, freeze, small, refused_",
    [(3, 0, 0, False), (4, 0, 0, True), (1, 3, 0, False), (1, 4, 0, True), (2, 0, 2, True), (1, 2, 2, False)],
)
def test_a_patience_that_could_not_stop_the_run_before_its_end_is_refused(patience, freeze, small, refused_):
    args = Namespace(patience=patience, freeze_epochs=freeze, small_epochs=small, epochs=5)
    if not refused_:  # e.g. patience 3: best at epoch 1, no lower loss in 2, 3, 4: stopped after epoch 4 of 5
        return train.check_patience(args)
    with pytest.raises(data.UserError, match=f"--patience {patience} could stop this 5-epoch run no earlier than") as e:
        train.check_patience(args)
    message = str(e.value)  # only advice that can be followed: --patience is at least 1
    assert ("a smaller --patience" in message) == (patience > 1) and message.endswith("or no --patience")
    assert ("the head's alone" in message) == bool(freeze) and ("stored size do not count" in message) == bool(small)


def test_a_resume_with_fewer_epochs_that_leave_patience_nothing_to_do_is_refused():
    args = Namespace(arch=model.ARCH, epochs=3, patience=2, freeze_epochs=0, small_epochs=0, warmup_epochs=1)
    progress = dict(history=[{"epoch": 1}], config=dict(epochs=6))  # a run planned for 6, resumed for 3
    with pytest.raises(data.UserError, match="--patience 2 could stop this 3-epoch run no earlier than its last") as no:
        train.check_resumable(Path("run"), args, progress, None)
    assert str(no.value).endswith("it would do nothing; pass more --epochs")  # a resumed run keeps its --patience


def saved(image, path, expected):
    image.save(path)
    return path, expected


def mode_cases(folder):
    """(file, the RGB it must read as, or None: skipped) for each mode PIL opens files in."""
    folder.mkdir(parents=True)
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    rgb = np.stack([gray, 255 - gray, np.full_like(gray, 60)], axis=2)
    as_rgb, gray_rgb = Image.fromarray(rgb), np.repeat(gray[..., None], 3, axis=2)
    sixteen = Image.fromarray(gray.astype(np.uint16) * 257)  # 16 bits: each 8-bit value v is v * 257
    big_endian = Image.frombytes("I;16B", (8, 8), (gray.astype(">u2") * 257).tobytes())
    half_transparent = Image.fromarray(np.stack([gray, np.full_like(gray, 128)], axis=2), "LA")
    on_white = np.repeat((gray.astype(float) * 128 / 255 + 127).round()[..., None], 3, axis=2)
    return [
        saved(as_rgb.convert("1"), folder / "bilevel.png", np.asarray(as_rgb.convert("1").convert("RGB"))),
        saved(Image.fromarray(gray), folder / "gray.png", gray_rgb),
        saved(sixteen, folder / "sixteen.png", gray_rgb),
        saved(sixteen, folder / "sixteen.tif", gray_rgb),
        saved(big_endian, folder / "sixteen_big_endian.tif", gray_rgb),
        saved(half_transparent, folder / "gray_alpha.png", on_white),
        saved(as_rgb.convert("YCbCr"), folder / "ycbcr.tif", rgb),
        saved(as_rgb.convert("LAB"), folder / "lab.tif", rgb),
        saved(as_rgb.convert("CMYK"), folder / "cmyk.tif", rgb),
        saved(Image.fromarray(gray.astype(np.int32)), folder / "int32.tif", None),
        saved(Image.fromarray(gray.astype(np.int16) - 100), folder / "signed16.tif", None),  # I;16S: no fixed range
        saved(Image.fromarray(gray.astype(np.float32) / 255), folder / "float.tif", None),
    ]


def other_depths(folder):
    """PGMs of over 8 bits (any maxval: Pillow opens them as I, scaled to 16 bits) and a 16-bit PNG with a
    transparent value, with what they must read as."""
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    ten_bits = (gray.astype(np.uint32) * 1023 // 255).astype(">u2")
    (folder / "ten_bits.pgm").write_bytes(b"P5\n8 8\n1023\n" + ten_bits.tobytes())
    sixteen = Image.fromarray(gray.astype(np.uint16) * 257)
    sixteen.save(folder / "transparent16.png", transparency=0)  # the first pixel's value: transparent
    on_white = np.repeat(gray[..., None], 3, axis=2).astype(int)
    on_white[0, 0] = data.TRANSPARENT_BACKGROUND
    Image.fromarray(gray).save(folder / "signed8.tif", tiffinfo={339: 2})  # SampleFormat: signed; Pillow says L
    sixteen.save(folder / "min_is_white16.tif", tiffinfo={262: 0})  # PhotometricInterpretation: 0 is white
    twelve_bits(folder / "twelve_bits.tif", gray)
    rgb = np.stack([gray, 255 - gray, gray // 2], axis=-1).astype(np.uint16) * 257
    rgb[0, 0] = [0x1234, 0x5678, 0x9ABC]  # transparent: high and low bytes differ, so Pillow alone left it opaque
    rgb[0, 1] = [0x1235, 0x5678, 0x9ABC]  # the same but for a low byte: opaque
    rgb16_png(folder / "transparent_rgb16.png", rgb, transparent=rgb[0, 0])
    rgb_on_white = (rgb >> 8).astype(int)
    rgb_on_white[0, 0] = data.TRANSPARENT_BACKGROUND
    return [
        (folder / "transparent_rgb16.png", rgb_on_white),
        (folder / "twelve_bits.tif", np.repeat(gray[..., None], 3, axis=2)),
        (folder / "ten_bits.pgm", np.repeat(gray[..., None], 3, axis=2)),
        (folder / "transparent16.png", on_white),
        (folder / "signed8.tif", None),
        (folder / "min_is_white16.tif", np.repeat(255 - gray[..., None], 3, axis=2)),
    ]


def rgb16_png(path, pixels, transparent):
    """A 16-bit RGB PNG (Pillow writes none) whose tRNS chunk makes one colour transparent."""

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    height, width, _ = pixels.shape
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in pixels)  # filter 0 before each row
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)  # 16 bits, colour type 2: RGB
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"tRNS", struct.pack(">3H", *transparent))
        + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    )  # fmt: skip


def twelve_bits(path, gray):
    """An 8x8 12-bit grayscale TIFF, as scanners write them: Pillow opens it as I;16 of 0..4095."""
    values = (gray.astype(np.uint32) * 4095 // 255).flatten().tolist()
    pixels = bytes(b for a, c in zip(values[::2], values[1::2]) for b in (a >> 4, (a & 15) << 4 | c >> 8, c & 255))
    # (tag, type: 3 short, 4 long, value): width, height, bits, no compression, black is 0, where the
    # pixels start (after the 8-byte header, this 9-entry directory and its 4-byte end), 1 sample, 8 rows, size
    tags = [(256, 4, 8), (257, 4, 8), (258, 3, 12), (259, 3, 1), (262, 3, 1), (273, 4, 122), (277, 3, 1),
            (278, 4, 8), (279, 4, len(pixels))]  # fmt: skip
    entries = b"".join(struct.pack("<HHI" + ("I" if kind == 4 else "HH"), tag, kind, 1, value, *[0] * (kind == 3))
                       for tag, kind, value in tags)  # fmt: skip
    path.write_bytes(b"II*\0" + struct.pack("<IH", 8, len(tags)) + entries + b"\0" * 4 + pixels)


def test_every_mode_is_read_right_or_skipped(tmp_path):
    cases = mode_cases(tmp_path / "modes")
    for path, expected in cases + other_depths(tmp_path / "modes"):
        pixels = data.read_image(path, 8)
        if expected is None:
            assert pixels is None, path.name  # not black: no fixed range to read it in
        else:
            # within PIL's 8-bit rounding (LAB's is the coarsest): the errors caught are black or white images
            assert pixels is not None and np.abs(pixels.astype(int) - expected).max() <= 32, path.name


def test_an_image_too_large_to_open_safely_is_skipped_and_said_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 20x20 is over twice that: a decompression bomb to PIL
    Image.new("RGB", (20, 20)).save(tmp_path / "huge.png")
    assert data.read_image(tmp_path / "huge.png", 8) is None
    data.say_unreadable([str(tmp_path / "huge.png")], 2)
    assert "too large to open safely" in capsys.readouterr().out  # the reasons named only broken or 32-bit files


@pytest.mark.parametrize("mode", ["La", "RGBa", "HSV", "PA"])
def test_modes_only_made_in_memory_convert_to_their_colours(mode):
    rgba = Image.new("RGBA", (4, 4), (200, 40, 40, 255))
    pixels = np.asarray(data.to_rgb(rgba.convert("LA").convert(mode) if mode == "La" else rgba.convert(mode)))
    expected = (rgba.convert("L").getpixel((0, 0)),) * 3 if mode == "La" else (200, 40, 40)
    assert np.abs(pixels[0, 0].astype(int) - expected).max() <= 40, (mode, pixels[0, 0])  # P, HSV: coarse


def test_a_float_image_is_named_in_training_and_predict(tmp_path, trained_run, capsys):
    root = two_classes(tmp_path / "d")
    Image.fromarray(np.full((32, 32), 0.5, np.float32)).save(root / "train" / "ant" / "float.tif")
    data.load_split(root, 32, 0.25, 0, cache_dir=tmp_path / "cache")
    assert "float.tif" in capsys.readouterr().out
    photos = tmp_path / "photos"
    write_images(photos, 2)
    os.link(root / "train" / "ant" / "float.tif", photos / "float.tif")
    evaluate.main([str(trained_run / "best.safetensors"), "--predict", str(photos), "--no-plots"])
    out = capsys.readouterr().out
    assert "skipped 1 unreadable image(s)" in out and "float.tif" in out and "2 image(s)" in out


# ---------------------------------------------------------------------------------- nothing is lost


def closed_console(monkeypatch):
    """In this process: stdout a pipe nobody reads, unbuffered, as in a container."""
    reader, writer = os.pipe()
    os.close(reader)
    monkeypatch.setattr(sys, "stdout", open(writer, "w", buffering=1))


def test_files_asked_for_are_written_when_stdout_closes(trained_run, image_folder, tmp_path, monkeypatch):
    checkpoint = str(trained_run / "best.safetensors")
    closed_console(monkeypatch)
    evaluate.main([checkpoint, "--no-plots", "--json", str(tmp_path / "r.json")])
    assert json.loads((tmp_path / "r.json").read_text())["num_samples"] == 50
    train.main(quick_args(image_folder, tmp_path / "run", "--epochs", 1))
    assert len(json.loads((tmp_path / "run" / "history.json").read_text())) == 1  # trained, not stopped at once
    predict = ["--predict", str(image_folder / "test" / "cat"), "--csv", str(tmp_path / "p.csv")]
    evaluate.main([checkpoint, *predict, "--plot-dir", str(tmp_path / "sheets")])
    assert len(list(csv.reader((tmp_path / "p.csv").open()))) == 1 + 5
    assert (tmp_path / "sheets" / "best_predictions.png").is_file()


def test_a_data_folder_named_like_a_temporary_build_keeps_its_cache(tmp_path, capsys):
    cache = tmp_path / "cache"
    looks_temporary = two_classes(tmp_path / "ds.tmp-1")
    data.load_images(looks_temporary, "train", cache_dir=cache)
    data.load_images(two_classes(tmp_path / "other"), "train", cache_dir=cache)  # its build tidies up
    capsys.readouterr()
    data.load_images(looks_temporary, "train", cache_dir=cache)
    assert "from the cache" in capsys.readouterr().out


def test_the_runs_cache_follows_it_into_evaluate_and_a_resume(tmp_path, capsys):
    root, cache = two_classes(tmp_path / "cache-follows"), tmp_path / "my-cache"  # a name no other test decodes
    train.main(short_run(root, tmp_path / "run", "--cache-dir", cache, "--schedule", "constant"))  # extended below
    assert f"--cache-dir {cache}" in capsys.readouterr().out.split("evaluate: ")[-1]
    evaluate.main([str(tmp_path / "run" / "best.safetensors"), "--split", "val", "--no-plots"])
    assert f"from the cache {cache}" in capsys.readouterr().out
    assert not any(data.default_cache_dir().glob("cache-follows-train-*")), "decoded again into the default cache"
    train.main(["--output-dir", str(tmp_path / "run"), "--resume", "--epochs", "2"])  # as the printed command
    out = capsys.readouterr().out
    assert f"from the cache {cache}" in out and f"--cache-dir {cache}" in out.split("evaluate: ")[-1]
    earlier = shutil.copy(tmp_path / "run" / "best.safetensors", tmp_path / "run" / "earlier.safetensors")
    moved = tmp_path / "moved-cache"  # resumed with another cache: a checkpoint from before follows the run
    train.main(["--output-dir", str(tmp_path / "run"), "--resume", "--epochs", "3", "--cache-dir", str(moved)])
    capsys.readouterr()
    evaluate.main([str(earlier), "--split", "val", "--no-plots"])
    assert f"from the cache {moved}" in capsys.readouterr().out


# ---------------------------------------------------------------------------------- no traceback


def test_a_two_stage_checkpoint_gives_its_backbone(tmp_path):
    groups = [[0, 1, 8, 9], [2, 3, 4, 5, 6, 7]]
    two_stage = model.build_model(10, "imagenet", "none", groups)
    save_file(two_stage.state_dict(), tmp_path / "best.safetensors")
    plain = model.build_model(10, "imagenet", str(tmp_path / "best.safetensors"))
    assert torch.equal(plain.conv1.weight, two_stage.conv1.weight)
    assert plain.fc.out_features == 10


def test_mixing_alphas_are_bounded_where_the_sampler_runs(capsys):
    for flag in ("--mixup", "--cutmix"):
        with pytest.raises(SystemExit):
            train.parse_args([flag, "1e6"])
        assert "at most 1000" in capsys.readouterr().err
    images, labels = torch.rand(4, 3, 8, 8), torch.arange(4)
    for alphas in ((1000, 0), (0, 1000), (1000, 1000)):
        mixed, _, share = data.mix(images, labels, torch.Generator().manual_seed(0), *alphas)
        assert mixed.isfinite().all() and 0 <= share.item() <= 1, alphas  # CutMix's box: cut at the borders
    assert 0.45 < data.mix(images, labels, torch.Generator().manual_seed(0), 1000)[2].item() < 0.55


# ---------------------------------------------------------------------------------- what a user types


def test_a_held_out_folder_of_test_classes_alone_evaluates(trained_run, image_folder, tmp_path, capsys):
    held_out = tmp_path / "held-out"
    held_out.mkdir()
    (held_out / "test").symlink_to(image_folder / "test")
    evaluate.main([str(trained_run / "best.safetensors"), "--data-dir", str(held_out), "--no-plots"])
    out = capsys.readouterr().out
    assert ": 50 images" in out and "(fitted on the run's validation split)" in out  # other images: fair
    message = refused([trained_run / "best.safetensors", "--data-dir", held_out, "--split", "val"], evaluate.main)
    assert "has test/ but no train/ or val/ to take a validation split from; drop --split val" in message


def test_a_test_class_whose_images_cannot_be_read_is_refused_not_scored_zero(trained_run, image_folder, tmp_path):
    shutil.copytree(image_folder / "test", tmp_path / "held-out" / "test")
    for image in (tmp_path / "held-out" / "test" / "dog").iterdir():
        image.write_text("not an image")
    message = refused([trained_run / "best.safetensors", "--data-dir", tmp_path / "held-out"], evaluate.main)
    assert "none of the test/ images of class 'dog' could be read" in message


def test_a_validation_folder_alone_evaluates_with_split_val(trained_run, image_folder, tmp_path, capsys):
    held_out = tmp_path / "held-out"
    held_out.mkdir()
    (held_out / "valid").symlink_to(image_folder / "test")
    evaluate.main([str(trained_run / "best.safetensors"), "--data-dir", str(held_out), "--split", "val", "--no-plots"])
    out = capsys.readouterr().out
    assert ": 50 images" in out and "on its own, whole: none of the run's training images" in out
    assert "(fitted on the run's validation split: optimistic if these are its images)" in out  # unchecked
    message = refused([trained_run / "best.safetensors", "--data-dir", held_out], evaluate.main)  # --split test
    assert "has valid/ but no test/; pass --split val" in message
    (held_out / "valid").unlink()
    (held_out / "valid").symlink_to(image_folder / "train")  # the run's training images, as a val/ alone
    message = refused([trained_run / "best.safetensors", "--data-dir", held_out, "--split", "val"], evaluate.main)
    assert "image(s) of" in message and "valid/ would measure images the network trained on" in message


def test_a_split_folder_given_as_data_dir_names_its_parent(trained_run, image_folder):
    message = refused([trained_run / "best.safetensors", "--data-dir", image_folder / "train"], evaluate.main)
    assert "is a split's folder" in message and f"holds it, {image_folder}" in message


def test_a_run_folder_inside_a_split_folder_is_refused_before_it_is_made(tmp_path):
    root = two_classes(tmp_path / "d")
    for out in (root / "train" / "run", root / "val" / "run"):  # a val/ made there would split anew too
        message = refused(short_run(root, out))
        assert message.startswith(f"error: --output-dir {out} is inside {out.parent}") and not out.exists()


def test_plain_sgd_without_momentum_runs():  # Nesterov needs one: refused (test_controls)
    assert train.parse_args(["--momentum", "0", "--no-nesterov"]).momentum == 0


def test_a_cache_inside_the_training_folder_is_refused_before_it_is_written(tmp_path):
    root = two_classes(tmp_path / "d")
    message = refused(short_run(root, tmp_path / "run", "--cache-dir", root / "train" / "cache"))
    assert "is inside" in message and "read as a class" in message
    assert not (root / "train" / "cache").exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("paths", [["{d}", "{d}"], ["{d}", "{d}/cat"], ["{d}/cat/0000.jpg", "{d}"]])
def test_overlapping_predict_paths_predict_each_file_once(paths, trained_run, image_folder, tmp_path):
    named = [path.format(d=image_folder / "test") for path in paths]
    table = tmp_path / "p.csv"
    evaluate.main([str(trained_run / "best.safetensors"), "--predict", *named, "--csv", str(table), "--no-plots"])
    rows = [row[0] for row in csv.reader(table.open())][1:]
    assert len(rows) == len(set(rows)) == 50


def test_a_file_named_outright_is_listed_by_its_name_not_by_a_link_in_a_folder(trained_run, tmp_path):
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "plain.jpg")
    (tmp_path / "a_link.jpg").symlink_to(tmp_path / "plain.jpg")  # met first in the folder
    table = tmp_path / "p.csv"
    for paths in ([tmp_path, tmp_path / "plain.jpg"], [tmp_path / "plain.jpg", tmp_path]):
        evaluate.main([str(trained_run / "best.safetensors"), "--predict", *map(str, paths), "--csv", str(table),
                       "--no-plots", "--overwrite"])  # fmt: skip
        assert [row[0] for row in csv.reader(table.open())][1:] == [str(tmp_path / "plain.jpg")]


def test_a_broken_link_or_a_loop_named_outright_is_skipped_and_named(trained_run, tmp_path, capsys):
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "plain.jpg")
    (tmp_path / "broken.jpg").symlink_to(tmp_path / "gone.jpg")
    (tmp_path / "loop.jpg").symlink_to(tmp_path / "loop.jpg")
    names = [str(tmp_path / name) for name in ("broken.jpg", "plain.jpg", "loop.jpg")]
    evaluate.main([str(trained_run / "best.safetensors"), "--predict", *names, "--no-plots"])
    out = capsys.readouterr().out
    assert "1 image(s)" in out and "broken.jpg" in out and "loop.jpg" in out
    for i in range(6):  # more than a run's warning names: each named, as --predict keeps no manifest
        (tmp_path / f"text{i}.jpg").write_text("not an image")
    evaluate.main([str(trained_run / "best.safetensors"), "--predict", str(tmp_path), "--no-plots"])
    warning = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("warning: skipped 8"))
    assert all(f"text{i}.jpg" in warning for i in range(6)) and "..." not in warning
    with pytest.raises(SystemExit, match="gone.jpg does not exist"):  # a path that is nothing at all
        evaluate.main([str(trained_run / "best.safetensors"), "--predict", str(tmp_path / "gone.jpg")])


def test_a_folder_with_a_link_back_to_itself_lists_each_file_once(tmp_path, capsys):
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "plain.jpg")
    (tmp_path / "broken.jpg").symlink_to(tmp_path / "gone.jpg")
    (tmp_path / "loop").symlink_to(tmp_path)  # --predict DIR: DIR was entered again through it
    assert evaluate.image_files([tmp_path]) == [tmp_path / "broken.jpg", tmp_path / "plain.jpg"]
    assert "skipped 1 link(s)" in capsys.readouterr().out
    assert evaluate.image_files([tmp_path / "loop" / "broken.jpg", tmp_path]) == [tmp_path / "loop" / "broken.jpg",
                                                                                  tmp_path / "plain.jpg"]  # fmt: skip
    # two broken links to one missing file are no training image held out: both are skipped, unread
    data.check_held_out([str(tmp_path / "broken.jpg")], [[str(tmp_path / "loop" / "broken.jpg")]], tmp_path, "it")


def test_a_fifo_named_like_an_image_is_skipped_and_named_not_read(trained_run, tmp_path, capsys):
    """Opening a FIFO waits for a writer forever: training, evaluation and --predict hung without a word."""
    root = two_classes(tmp_path / "data")
    os.mkfifo(root / "train" / "bee" / "zz.png")
    paths, _, _ = data.list_images(root, "train")
    assert len(paths) == 24 and not any(path.endswith("zz.png") for path in paths)
    assert "skipped 1 FIFO(s), socket(s) or device(s), not image files, e.g. zz.png" in capsys.readouterr().out
    folder = root / "train" / "bee"
    assert len(evaluate.image_files([folder])) == 12 and "zz.png" in capsys.readouterr().out
    (folder / "link.png").symlink_to(folder / "zz.png")  # the FIFO again, named after it
    assert evaluate.image_files([folder / "000.png", folder / "zz.png", folder / "link.png"]) == [folder / "000.png"]
    assert "skipped 1 FIFO(s)" in capsys.readouterr().out
    message = refused([trained_run / "best.safetensors", "--predict", folder / "zz.png", "--no-plots"], evaluate.main)
    assert "none of the paths named is an image file or holds one" in message


def test_a_named_file_is_read_whatever_its_extension(trained_run, tmp_path, capsys):
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "photo.jfif", "JPEG")
    Image.new("RGB", (32, 32), (30, 30, 200)).save(tmp_path / "no_extension", "JPEG")
    evaluate.main([str(trained_run / "best.safetensors"), "--predict", str(tmp_path / "photo.jfif"),
                   str(tmp_path / "no_extension"), "--no-plots"])  # fmt: skip
    out = capsys.readouterr().out
    assert "2 image(s)" in out and "photo.jfif" in out and "no_extension" in out


def test_resuming_after_the_class_weights_run_moved_keeps_its_weights(tmp_path, monkeypatch, capsys):
    two_classes(tmp_path / "d")
    fake_run_checkpoint(tmp_path / "earlier", ["ant", "bee"], [0.9, 0.5])
    monkeypatch.chdir(tmp_path)
    constant = ["--schedule", "constant"]  # each resume below trains more
    command = short_run("d", "run", "--class-weights", "earlier/best.safetensors", *constant)
    train.main(command)
    (tmp_path / "earlier").rename(tmp_path / "moved")
    train.main([*command, "--resume", "--epochs", "2"])
    assert "class weights: ant 0.333, bee 1.67" in capsys.readouterr().out
    assert len(json.loads((tmp_path / "run" / "history.json").read_text())) == 2
    moved = ["--class-weights", "moved/best.safetensors", *constant]  # named at its new place: the same file
    train.main([*short_run("d", "run", *moved), "--resume", "--epochs", "3"])
    assert len(json.loads((tmp_path / "run" / "history.json").read_text())) == 3
    fake_run_checkpoint(tmp_path / "other", ["ant", "bee"], [0.5, 0.9])
    other = ["--class-weights", "other/best.safetensors", *constant]  # another run's: refused, it changes nothing
    message = refused([*short_run("d", "run", *other), "--resume", "--epochs", "4"])
    assert "--class-weights" in message and "(the run's: " in message


# ---------------------------------------------------------------------------------- messages


@pytest.mark.parametrize(
    "main, argv, message",
    [
        (train.main, ["--data-dir", ""], "--data-dir: is empty"),
        (train.main, ["--output-dir", ""], "--output-dir: is empty"),
        (train.main, ["--weights", " "], "--weights: is blank"),
        (train.main, ["--targeted-augment", ""], "--targeted-augment: is empty"),  # before the data is read
        (train.main, ["--targeted-augment", "cat,"], "'cat,' holds an empty class name"),
        (train.main, ["--targeted-augment", "cat,dog,cat"], "names 'cat' twice; name each class once"),
        (evaluate.main, ["x.safetensors", "--json", ""], "--json: is empty"),
        (evaluate.main, ["x.safetensors", "--predict", "a.jpg", "--csv", ""], "--csv: is empty"),
        (evaluate.main, ["x.safetensors", "--top-k", "5"], "--top-k goes with --predict"),
        (evaluate.main, ["x.safetensors", "--export-onnx", "m.onnx", "--batch-size", "8"], "drop --batch-size"),
        (evaluate.main, ["x.safetensors", "--predict", "a.jpg", "--split", "val"], "drop --split"),
        (evaluate.main, ["x.safetensors", "--predict", "a.jpg", "--data-dir", "d"], "folder; drop --data-dir ("),
        (evaluate.main, ["x.safetensors", "--export-onnx", "m.onnx", "--explain"], "network; drop --explain ("),
        (evaluate.main, ["x.safetensors", "--export-onnx", "m.onnx", "--skip-data-check"], "or not; drop --skip"),
        (
            evaluate.main,
            ["x.safetensors", "--export-onnx", "m.onnx", "--cache-dir", "none"],
            "given, and --cache-dir pick",
        ),
        (
            evaluate.main,
            ["x.safetensors", "--export-onnx", "m", "--json", "r.json", "--no-plots"],
            "drop --json and --no-plots (",
        ),
        (evaluate.main, ["x.safetensors", "--skip-data-check"], "--skip-data-check goes with --split val"),
        (evaluate.main, ["x.safetensors", "--no-plots", "--plot-dir", "p"], "draws none"),
        (train.main, ["--seed", "1" + "0" * 309], "at most 4294967295"),
        (train.main, ["--epochs", "1" + "0" * 309], "at most 10000"),
        (train.main, ["--epochs", "100000000000"], "at most 10000"),  # a typo's: its lr would stay at the peak
        (train.main, ["--epochs", "1_0"], "'1_0' is not an integer"),
        (train.main, ["--ema", "1"], "must be a number at least 0 and below 1, got 1 "),
        (evaluate.main, ["x.safetensors", "--predict", "a.jpg", "--top-k", "9" * 5000], "at most 9007199254740992"),
    ],
)
def test_empty_paths_and_flags_that_would_do_nothing_are_refused(main, argv, message, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and message in err and err.startswith("error: ")


def test_class_weights_given_a_run_folder_names_the_file_to_pass(tmp_path):
    fake_run_checkpoint(tmp_path / "earlier", ["ant", "bee"], [0.9, 0.5])
    # as the command line is read: no data folder is needed to say so (it was said after decoding)
    message = refused(short_run(tmp_path / "no-data", tmp_path / "run", "--class-weights", tmp_path / "earlier"))
    assert f"is a folder; pass a run's checkpoint: {tmp_path / 'earlier' / 'best.safetensors'}" in message
    message = refused(short_run(tmp_path / "no-data", tmp_path / "run", "--class-weights", tmp_path / "gone.json"))
    assert f"--class-weights '{tmp_path / 'gone.json'}' is not none, auto, a file or a list of numbers" in message
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "history, reason",
    [  # Python's reprs before: ('val_loss'), (-1), and a count "of typed weights" that named no file
        ([{"epoch": 1}], "(not a list of epochs with their val_loss)"),
        ({"epoch": 1}, "(not a list of epochs with their val_loss)"),
        ([{"epoch": 1, "val_loss": 1.0}], "(no 'val_per_class')"),
        ([{"epoch": 1, "val_loss": 1.0, "val_per_class": [0.9]}], "(1 per-class accuracies for 2 classes)"),
    ],
)
def test_class_weights_from_a_damaged_history_say_what_it_lacks(history, reason, tmp_path):
    run = fake_run_checkpoint(tmp_path / "earlier", ["ant", "bee"], [0.9, 0.5])
    (run / "history.json").write_text(json.dumps(history))
    with pytest.raises(train.UserError, match=f"--class-weights {run / 'history.json'}: no per-class") as refused:
        train.class_weights(str(run / "history.json"), torch.tensor([0, 1]), ["ant", "bee"])
    assert reason in str(refused.value)


def test_two_validation_folders_are_refused_not_one_picked(tmp_path):
    root = two_classes(tmp_path / "d")
    shutil.copytree(root / "train", root / "val")
    shutil.copytree(root / "train", root / "valid")  # valid/ was passed over without a word
    message = refused(short_run(root, tmp_path / "run"))
    assert message == f"error: {root} has val/ and valid/; keep one validation folder"
    assert not (tmp_path / "run").exists()


def test_a_run_folder_for_weights_names_the_file_to_pass(trained_run, image_folder, tmp_path):
    message = refused(short_run(image_folder, tmp_path / "other", "--weights", trained_run))
    assert f"is a folder; pass a run's checkpoint: {trained_run / 'best.safetensors'}" in message
    message = refused([trained_run / "state"], evaluate.main)  # its resumable state: the run's file is named
    assert f"is a folder; pass a run's checkpoint: {trained_run / 'best.safetensors'}" in message


def test_a_fifo_given_as_a_file_is_named_as_one(image_folder, tmp_path):
    os.mkfifo(tmp_path / "w.safetensors")  # was "not found"; a file that is there
    said = "is a FIFO, socket or device, not a file; pass a file"
    assert said in refused([tmp_path / "w.safetensors"], evaluate.main)
    for flag in ("--weights", "--class-weights"):
        assert f"{flag} {tmp_path / 'w.safetensors'} {said}" in refused(
            short_run(image_folder, tmp_path / "run", flag, tmp_path / "w.safetensors")
        )


def test_a_missing_weights_file_is_refused_before_the_data_is_read(tmp_path):
    message = refused(short_run(tmp_path / "no-data", tmp_path / "run", "--weights", tmp_path / "resnet.pth"))
    assert f"weights file {tmp_path / 'resnet.pth'} not found" in message  # not the missing data first
    assert not (tmp_path / "run").exists()


def test_files_reached_twice_are_counted_once(trained_run, tmp_path, capsys):
    write_images(tmp_path / "photos", 2)
    (tmp_path / "photos" / "notes.txt").write_text("not an image")
    (tmp_path / "photos" / "readme.txt").write_text("not an image either")
    twice = [str(tmp_path / "photos")] * 2
    evaluate.main([str(trained_run / "best.safetensors"), "--predict", *twice, "--no-plots"])
    assert "skipped 2 file(s) without an image extension" in capsys.readouterr().out
    named = [str(tmp_path / "photos"), str(tmp_path / "photos" / "readme.txt")]  # read, as named: not passed over
    evaluate.main([str(trained_run / "best.safetensors"), "--predict", *named, "--no-plots"])
    out = capsys.readouterr().out
    assert "1 unreadable image(s)" in out  # readme.txt, named
    assert "skipped 1 file(s) without an image extension (data.IMAGE_EXTENSIONS), e.g. notes.txt; named outright" in out


def test_hidden_files_and_folders_are_passed_over_and_named_unless_named_outright(trained_run, tmp_path, capsys):
    write_images(tmp_path / "photos", 2)
    first = sorted((tmp_path / "photos").iterdir())[0]
    shutil.copy(first, tmp_path / "photos" / "._copy.png")  # macOS's AppleDouble files look like this
    write_images(tmp_path / "photos" / ".thumbnails", 1)
    checkpoint = str(trained_run / "best.safetensors")
    evaluate.main([checkpoint, "--predict", str(tmp_path / "photos"), "--no-plots"])
    out = capsys.readouterr().out
    assert ": 2 image(s);" in out and "skipped 2 hidden file(s) and folder(s) (names starting with '.'), e.g." in out
    named = [str(tmp_path / "photos"), str(tmp_path / "photos" / "._copy.png")]
    evaluate.main([checkpoint, "--predict", *named, "--no-plots"])
    out = capsys.readouterr().out
    assert ": 3 image(s);" in out and "skipped 1 hidden file(s) and folder(s)" in out
    root = two_classes(tmp_path / "d", count=3)
    (root / "train" / "ant" / "._0.png").write_bytes(b"resource fork")  # not decoded, not named unreadable
    write_images(root / "train" / ".cow", 3)  # a hidden class-level folder is no class, and said
    shutil.copy(first, root / "train" / "loose.png")  # an image in no class folder: said
    _, labels, classes = data.list_images(root, "train")
    assert labels.tolist() == [0, 0, 0, 1, 1, 1] and classes == ["ant", "bee"]
    out = capsys.readouterr().out
    assert "skipped 2 hidden file(s) and folder(s)" in out
    assert "skipped 1 file(s) beside the class folders, in none of them, e.g. loose.png" in out


def test_top_k_above_the_number_of_classes_is_one_error_line(trained_run, tmp_path):
    write_images(tmp_path / "photos", 1)
    with pytest.raises(SystemExit) as refusal:
        evaluate.main([str(trained_run / "best.safetensors"), "--predict", str(tmp_path / "photos"), "--top-k", "11"])
    assert str(refusal.value.code) == (
        "error: --top-k 11 asks for more than the checkpoint's 10 classes; pass at most 10"
    )
    assert not (tmp_path / "photos" / "predictions").exists() and len(list((tmp_path / "photos").iterdir())) == 1


def test_a_file_name_of_other_bytes_trains_and_is_predicted(tmp_path, capsys):
    root = two_classes(tmp_path / "d")
    odd = os.fsdecode(bytes(root / "train" / "ant") + b"/caf\xe9.png")  # Latin-1, as an old zip's
    Image.new("RGB", (32, 32), (200, 30, 30)).save(odd)
    os.rename(root / "train" / "bee", os.fsdecode(bytes(root / "train") + b"/b\xe9e"))  # a class folder too
    train.main(short_run(root, tmp_path / "run"))
    table, sheets = tmp_path / "p.csv", tmp_path / "sheets"
    predict = ["--predict", str(root / "train" / "ant"), "--csv", str(table), "--plot-dir", str(sheets)]
    evaluate.main([str(tmp_path / "run" / "best.safetensors"), *predict])
    assert b"caf\xe9.png" in table.read_bytes() and (sheets / "best_predictions.png").is_file()
    evaluate.main([str(tmp_path / "run" / "best.safetensors"), "--split", "val", "--plot-dir", str(sheets)])
    assert (sheets / "best_val_confusion.png").is_file()  # the class's name drawn escaped, not a traceback


def test_a_json_or_csv_of_yours_is_kept_unless_overwrite(trained_run, tmp_path, capsys):
    mine, checkpoint = tmp_path / "settings.json", str(trained_run / "best.safetensors")
    mine.write_text('{"lr": 0.1}')
    with pytest.raises(SystemExit, match="exists and is not one evaluate.py wrote; pass --overwrite"):
        evaluate.main([checkpoint, "--no-plots", "--json", str(mine)])
    assert mine.read_text() == '{"lr": 0.1}'
    evaluate.main([checkpoint, "--no-plots", "--json", str(mine), "--overwrite"])
    evaluate.main([checkpoint, "--no-plots", "--json", str(mine)])  # its own: rewritten without a word
    assert json.loads(mine.read_text())["num_samples"] == 50 and "replaced the results" not in capsys.readouterr().out
    evaluate.main([checkpoint.replace("best", "last"), "--no-plots", "--json", str(mine)])  # another's: said
    assert f"replaced the results of {checkpoint} (--split test) it held" in capsys.readouterr().out


def test_a_test_folder_without_every_class_points_to_the_runs_split(image_folder, tmp_path, capsys):
    root = two_classes(tmp_path / "d")
    write_images(root / "test" / "ant", 3)  # no bee: the run's classes are not all there
    train.main(short_run(root, tmp_path / "run"))
    assert "--split val" in capsys.readouterr().out.split("evaluate: ")[-1]
    with pytest.raises(SystemExit, match=r"or the run's own split: --split val, on the run's --data-dir") as refused:
        evaluate.main([str(tmp_path / "run" / "best.safetensors"), "--no-plots"])
    assert f"differ from the class folders in {root / 'test'}: ['ant']" in str(refused.value.code)  # not root's
    (tmp_path / "alone").mkdir()
    (root / "test").rename(tmp_path / "alone" / "val")  # a val/ alone, as --split val reads it: given already
    with pytest.raises(SystemExit) as refused:
        evaluate.main(
            [
                str(tmp_path / "run" / "best.safetensors"),
                "--data-dir",
                str(tmp_path / "alone"),
                "--split",
                "val",
                "--no-plots",
            ]
        )
    assert "of the checkpoint's classes, all of them" in str(refused.value.code)
    assert "--split val" not in str(refused.value.code)


def test_printed_commands_name_the_script_relative_from_its_folder_else_absolute(monkeypatch, tmp_path):
    def other_drive(path, start=None):
        raise ValueError("path is on mount 'D:', start on mount 'C:'")  # what Windows' relpath raises

    script = str(Path(train.__file__).with_name("train.py"))
    monkeypatch.chdir(Path(train.__file__).parent)
    assert train.beside("train.py") == "train.py"
    monkeypatch.chdir(tmp_path)  # from another folder: absolute, not ../../scripts/train.py
    assert train.beside("train.py") == script
    monkeypatch.setattr(train, "__file__", str(Path(script).parent / "tests" / ".." / "train.py"))  # as typed
    assert train.beside("train.py") == script  # not .../tests/../train.py
    monkeypatch.setattr(os.path, "relpath", other_drive)
    assert train.beside("train.py") == script


def test_predict_skips_its_own_sheets_and_keeps_a_photo_bearing_a_plots_name(trained_run, tmp_path, capsys):
    write_images(tmp_path / "photos", 2)
    checkpoint = str(trained_run / "best.safetensors")
    for _ in range(2):  # the second time, the first's sheet lies among the photos
        evaluate.main([checkpoint, "--predict", str(tmp_path / "photos"), "--plot-dir", str(tmp_path / "photos")])
    out = capsys.readouterr().out
    assert out.count("2 image(s)") == 2 and "3 image(s)" not in out
    Image.new("RGB", (32, 32)).save(tmp_path / "best_predictions.png")  # a photo of the user's
    with pytest.raises(SystemExit, match="is not a plot of evaluate.py"):
        evaluate.main(
            [checkpoint, "--predict", str(tmp_path / "photos" / "000.png"), "--plot-dir", str(tmp_path), "--csv",
             str(tmp_path / "p.csv")]
        )  # fmt: skip
    assert png_source_is_none(tmp_path / "best_predictions.png")
    assert not (tmp_path / "p.csv").exists()  # refused before any work: nothing written
    Image.new("RGB", (32, 32)).save(tmp_path / "best_test_confusion.png")
    with pytest.raises(SystemExit, match="best_test_confusion.png is not a plot of evaluate.py"):
        evaluate.main([checkpoint, "--plot-dir", str(tmp_path), "--json", str(tmp_path / "r.json")])
    assert not (tmp_path / "r.json").exists()
    evaluate.main([checkpoint, "--predict", str(tmp_path / "photos" / "000.png"), "--tta", "--no-plots"])
    assert "each averaged with its mirror (--tta)" in capsys.readouterr().out


def test_a_cache_is_named_after_its_folder_however_the_folder_is_spelled(tmp_path, monkeypatch):
    (tmp_path / "d" / "train").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "d" / "train")
    named = data.cache_folder([], 32, Path("..") / "train", tmp_path / "cache").name  # --data-dir ..
    assert (
        named.startswith("d-train-32px-")
        and named == data.cache_folder([], 32, tmp_path / "d" / "train", tmp_path / "cache").name
    )


def png_source_is_none(path):
    return evaluate.png_source(path) is None


def test_a_warmup_longer_than_the_run_is_refused(capsys):
    assert train.parse_args(["--epochs", "1"]).warmup_epochs == 1  # a run of warmup alone: its lr reaches the peak
    with pytest.raises(SystemExit):
        train.parse_args(["--epochs", "2", "--warmup-epochs", "2.5"])
    assert "--warmup-epochs 2.5 is longer than the run's 2 epochs: the lr would never reach" in capsys.readouterr().err
    # resumed: it was planned longer
    args = Namespace(arch=model.ARCH, epochs=2, freeze_epochs=0, small_epochs=0, warmup_epochs=3)
    with pytest.raises(train.UserError, match="--warmup-epochs 3, and --epochs 2 would end it before its lr reaches"):
        train.check_resumable(Path("run"), args, {"config": {"epochs": 3}, "history": [{}]}, None)


def test_huge_class_weights_are_scaled_not_overflowed():
    weights = train.class_weights("1e308,1e308,5e307", torch.tensor([0, 1, 2]), ["a", "b", "c"])
    assert torch.allclose(weights, torch.tensor([1.2, 1.2, 0.6]))


def test_a_new_run_keeps_a_state_folder_and_plots_of_yours(tmp_path, capsys):
    root, out = two_classes(tmp_path / "d"), tmp_path / "project"
    (out / "state").mkdir(parents=True)
    (out / "state" / "notes.txt").write_text("mine")
    Image.new("RGB", (8, 8)).save(out / "holiday_predictions.png")  # a name of evaluate.py's plots
    assert f"{out / 'state'} was not written by train.py or is damaged, and a run would replace it" in refused(
        short_run(root, out)
    )
    (out / "state").rename(out / "kept")
    train.main(short_run(root, out))
    assert (out / "kept" / "notes.txt").read_text() == "mine" and (out / "holiday_predictions.png").exists()
    evaluate.main([str(out / "best.safetensors"), "--split", "val"])
    shutil.copy(out / "best_val_confusion.png", out / "mine_confusion.png")  # a copy kept, under another name
    train.main(short_run(root, out, "--overwrite"))
    assert "removed best_val_calibration.png, best_val_confusion.png" in capsys.readouterr().out
    assert not (out / "curves.png").exists() and (out / "holiday_predictions.png").exists()
    assert (out / "mine_confusion.png").exists()
    evaluate.main([str(out / "best.safetensors"), "--split", "val"])
    (tmp_path / "other").mkdir()  # a plot of this run, copied beside another to compare: it stays
    shutil.copy(out / "best_val_confusion.png", tmp_path / "other" / "first_val_confusion.png")
    train.main(short_run(root, tmp_path / "other"))
    assert (tmp_path / "other" / "first_val_confusion.png").exists()


def test_data_dir_dot_inside_a_split_folder_names_its_parent(tmp_path, monkeypatch):
    root = two_classes(tmp_path / "d")
    monkeypatch.chdir(root / "train")
    with pytest.raises(data.UserError, match=f"-data-dir . is a split's folder; pass the folder that holds it, {root}"):
        data.list_images(Path("."), "test")


def test_nothing_is_written_into_a_runs_state(tmp_path):
    root, out = two_classes(tmp_path / "d"), tmp_path / "run"
    train.main(short_run(root, out))
    before = sorted(path.name for path in (out / "state").iterdir())
    assert "is inside" in refused(short_run(root, out / "state" / "inner")) and "a run's resumable state" in refused(
        short_run(root, out / "state")
    )
    message = refused([out / "best.safetensors", "--split", "val", "--plot-dir", out / "state"], evaluate.main)
    assert message.startswith(f"error: --plot-dir {out / 'state'} is inside {out / 'state'}, a run's resumable state")
    cache = ["--cache-dir", out / "state" / "c"]
    message = refused([out / "best.safetensors", "--split", "val", "--no-plots", *cache], evaluate.main)
    assert message.startswith(f"error: --cache-dir {out / 'state' / 'c'} is inside {out / 'state'}, a run's")
    assert "a run's resumable state" in refused([*short_run(root, out, "--epochs", "2"), "--resume", *cache])
    assert sorted(path.name for path in (out / "state").iterdir()) == before
    for inside in ("state-tmp", "state-old"):  # made and removed as the run saves: not there now
        assert f"is inside {out / inside}, a run's" in refused(
            [*short_run(root, tmp_path / "r2"), "--cache-dir", out / inside]
        )
        assert not (out / inside).exists() and not (tmp_path / "r2").exists()
    new = tmp_path / "new"  # a new run's own state/, not made yet
    message = refused([*short_run(root, new), "--cache-dir", new / "state"])
    assert (
        message == f"error: --cache-dir {new / 'state'} is inside {new / 'state'}, a run's resumable state; pass "
        f"a folder outside it"
    )
    assert not new.exists()


def test_files_of_yours_with_a_runs_names_are_never_replaced(tmp_path):
    root, out = two_classes(tmp_path / "d"), tmp_path / "project"
    (out / "resnet18-cifar10").mkdir(parents=True)  # the code itself, cloned into the run's folder
    (out / "resnet18-cifar10" / "train.py").write_text("")
    (out / "history.json").write_text('{"mine": 1}')
    for extra in ([], ["--overwrite"]):
        message = refused(short_run(root, out, *extra))
        assert (
            f"{out / 'history.json'} was not written by train.py or is damaged, and a run would replace it" in message
        )
    (out / "history.json").unlink()
    assert f"{out / 'resnet18-cifar10'} was not written by train.py" in refused(short_run(root, out, "--overwrite"))
    assert (out / "resnet18-cifar10" / "train.py").exists()


def test_a_console_closed_from_the_start_loses_no_file(trained_run, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "stderr", None)  # `2>&-`: Python starts without a stderr
    monkeypatch.setattr(sys, "stdout", None)
    train.main(short_run(two_classes(tmp_path / "d"), tmp_path / "run"))
    assert (tmp_path / "run" / "best.safetensors").is_file() and (tmp_path / "run" / "history.json").is_file()
    table = tmp_path / "p.csv"
    evaluate.main([str(trained_run / "best.safetensors"), "--predict", str(tmp_path / "d"), "--csv", str(table),
                   "--plot-dir", str(tmp_path / "sheets")])  # fmt: skip
    assert table.read_text().startswith("path,class") and (tmp_path / "sheets" / "best_predictions.png").is_file()


def test_a_thin_strip_is_read_without_a_resize_of_gigabytes(tmp_path, monkeypatch):
    Image.new("RGB", (1, 30000), (200, 40, 40)).save(tmp_path / "strip.png")  # 1x30000: 5.9 GB resized whole
    sizes, resize = [], Image.Image.resize
    monkeypatch.setattr(
        Image.Image, "resize", lambda image, size, *a, **k: sizes.append(size) or resize(image, size, *a, **k)
    )
    pixels = data.read_image(tmp_path / "strip.png", 256)
    assert pixels.shape == (256, 256, 3) and (pixels == (200, 40, 40)).all() and max(map(max, sizes)) <= 4 * 256


def test_the_recipe_line_names_every_control_that_is_on():
    args = train.parse_args(["--ema", "0.9", "--two-stage", "--targeted-augment", "animals", "--mixup", "0.2"])
    said = train.training_controls(args)
    assert said == ", mixup 0.2, targeted augmentation for animals, EMA 0.9, two-stage head"
    # every digit given: ':g' showed 0.99999999999 as "EMA 1", a different average
    assert train.training_controls(train.parse_args(["--ema", "0.99999999999"])) == ", EMA 0.99999999999"
