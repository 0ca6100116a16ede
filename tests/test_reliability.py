"""Reliability, round three: no wrong model without a word, the command a user naturally types
works, every image is read or named, nothing replaced without a word."""

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import ROOT, both_ranks, launch, quick_args, run_script
from PIL import Image, ImageOps
from safetensors.torch import save_file
from test_faults import epochs_in, one_error_line

import data
import evaluate
import train


def write_images(folder, count, side=32, colour=(200, 30, 30), ext="png"):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(folder)))
    for i in range(count):
        pixels = np.clip(np.array(colour) + rng.normal(0, 20, (side, side, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:03d}.{ext}")


def two_classes(root, count=12, side=32):
    write_images(root / "train" / "ant", count, side, (200, 30, 30))
    write_images(root / "train" / "bee", count, side, (30, 30, 200))
    return root


def refused(argv, main=train.main):
    """The one-line message a refused command exits with."""
    with pytest.raises(SystemExit) as stopped:
        main([str(arg) for arg in argv])
    message = str(stopped.value.code)
    assert message.startswith("error: ") and "\n" not in message
    return message


def short_run(folder, out, *extra):
    return [*quick_args(folder, out, "--batch-size", "4", "--epochs", "1"), *map(str, extra)]


# ---------------------------------------------------------------------------------- wrong results


def test_link_loops_and_second_links_list_each_image_once(tmp_path, capsys):
    root = two_classes(tmp_path / "d", count=5)
    os.symlink(root / "train" / "ant", root / "train" / "ant" / "loop")  # a folder that holds itself
    os.symlink(root / "train", root / "train" / "bee" / "up")  # a way back up into every class
    os.symlink(root / "train" / "ant" / "000.png", root / "train" / "bee" / "again.png")  # a file twice
    paths, labels, classes = data.list_images(root, "train")
    assert classes == ["ant", "bee"] and labels.tolist() == [0] * 5 + [1] * 5
    assert len({os.path.realpath(path) for path in paths}) == len(paths) == 10
    assert "skipped 3 link(s) or repeated path(s) to folders or images already listed" in capsys.readouterr().out


def test_a_folder_one_level_too_deep_or_a_single_class_is_refused(tmp_path):
    nested = tmp_path / "nested"
    two_classes(nested / "inner")
    (nested / "train").mkdir()
    (nested / "inner" / "train").rename(nested / "train" / "cifar")  # DIR/train/cifar/{ant,bee}/
    message = refused(quick_args(nested, tmp_path / "run1"))
    assert "one class folder, cifar, whose subfolders (ant, bee) hold the images" in message
    assert "move them directly under" in message
    single = tmp_path / "single"
    write_images(single / "train" / "ant", 20)
    assert "one class folder, ant; a classifier needs two or more" in refused(quick_args(single, tmp_path / "run2"))
    assert not (tmp_path / "run1").exists() and not (tmp_path / "run2").exists()


def fake_run_checkpoint(folder, classes, per_class):
    folder.mkdir(parents=True)
    metadata = {"classes": json.dumps(classes), "val_per_class": json.dumps(per_class)}
    save_file({"w": torch.zeros(1)}, folder / "best.safetensors", metadata=metadata)
    history = [{"epoch": 1, "val_loss": 1.0, "val_per_class": per_class}]
    (folder / "history.json").write_text(json.dumps(history))
    return folder


def test_class_weights_from_a_history_take_the_epoch_best_safetensors_holds(tmp_path):
    run = fake_run_checkpoint(tmp_path / "run", ["ant", "bee"], [0.9, 0.5])
    history = [  # after --small-epochs: an epoch at 32x32 with a lower loss is not the best one
        {"epoch": 1, "val_loss": 0.5, "val_per_class": [0.5, 0.9], "input_size": 32},
        {"epoch": 2, "val_loss": 1.0, "val_per_class": [0.9, 0.5], "input_size": 48},
    ]
    (run / "history.json").write_text(json.dumps(history))
    weights = [train.class_weights(str(run / name), torch.zeros(1, dtype=torch.long), ["ant", "bee"])
               for name in ("history.json", "best.safetensors")]  # fmt: skip
    assert torch.equal(*weights) and weights[0].argmax() == 1  # bee, the class epoch 2 got wrong more often


def test_class_weights_from_a_run_never_drop_a_class_and_check_its_names(tmp_path):
    labels = torch.zeros(1, dtype=torch.long)
    run = fake_run_checkpoint(tmp_path / "run", ["ant", "bee", "cat"], [1.0, 0.5, 0.8])
    for source in ("best.safetensors", "history.json"):
        weights = train.class_weights(str(run / source), labels, ["ant", "bee", "cat"])
        assert weights.min() > 0  # ant scored 100%, and is still learnt
        assert weights.mean().item() == pytest.approx(1.0) and weights.argmax() == 1
    with pytest.raises(data.UserError, match=r"that run's classes \['ant', 'bee', 'cat'\] are not these"):
        train.class_weights(str(run / "history.json"), labels, ["ant", "bee", "dog"])
    assert train.class_weights("0,1,1", labels, ["ant", "bee", "cat"])[0] == 0  # by hand, 0 is the user's call
    orphan = tmp_path / "orphan"
    orphan.mkdir()
    (orphan / "history.json").write_text((run / "history.json").read_text())
    with pytest.raises(data.UserError, match="with best.safetensors beside it"):
        train.class_weights(str(orphan / "history.json"), labels, ["ant", "bee", "cat"])


def test_the_class_weights_used_are_printed(tmp_path, capsys):
    root = two_classes(tmp_path / "d")
    train.main(short_run(root, tmp_path / "run", "--class-weights", "1,3"))
    assert "class weights: ant 0.5, bee 1.5" in capsys.readouterr().out


def with_scores(validated, **scores):
    """train.validate's (scores, logits, labels), with some scores replaced."""
    return validated[0] | scores, *validated[1:]


def test_a_resumed_run_whose_best_checkpoint_was_removed_says_so(tmp_path, monkeypatch, capsys):
    root = two_classes(tmp_path / "d")
    out = tmp_path / "run"
    train.main(short_run(root, out))
    (out / "best.safetensors").unlink()
    real = train.validate
    monkeypatch.setattr(train, "validate", lambda *a: with_scores(real(*a), val_loss=1e9))  # no epoch improves
    capsys.readouterr()
    train.main(short_run(root, out, "--resume", "--epochs", "2"))
    printed = capsys.readouterr().out
    assert "best.safetensors is missing (removed?)" in printed and "wrote" not in printed
    assert f"evaluate: python evaluate.py {out / 'last.safetensors'}" in printed
    assert not (out / "best.safetensors").exists()


# ---------------------------------------------------------------------------------- natural commands


def test_a_run_stopped_by_patience_is_finished_and_a_plain_resume_trains_nothing(tmp_path, monkeypatch, capsys):
    root = two_classes(tmp_path / "d")
    out = tmp_path / "run"
    losses = iter([1.0, 2.0, 3.0])
    real = train.validate
    monkeypatch.setattr(train, "validate", lambda *a: with_scores(real(*a), val_loss=next(losses)))
    command = short_run(root, out, "--epochs", "4", "--patience", "1")
    train.main(command)
    assert epochs_in(out) == [1, 2]
    assert "early stop: no lower validation loss in the 1 epoch(s) since epoch 1" in capsys.readouterr().out
    train.main([*command, "--resume"])
    assert "finished: --patience 1 stopped it after epoch 2" in (said := capsys.readouterr().out)
    assert "--epochs N, more than 4, continues it until an epoch without a lower loss stops it again" in said
    train.main(["--output-dir", str(out), "--resume", "--epochs", "2"])  # the epochs it trained: finished too
    assert "finished: --patience 1 stopped it after epoch 2" in capsys.readouterr().out
    assert epochs_in(out) == [1, 2]
    train.main(["--output-dir", str(out), "--resume", "--epochs", "6"])  # epoch 3's loss is higher still
    assert epochs_in(out) == [1, 2, 3]
    assert "no lower validation loss in the 2 epoch(s) since epoch 1" in capsys.readouterr().out


def test_a_finished_run_resumed_says_so_and_another_process_count_is_said(tmp_path, capsys):
    root = two_classes(tmp_path / "d")
    out = tmp_path / "run"
    train.main(short_run(root, out))
    capsys.readouterr()
    train.main(["--output-dir", str(out), "--resume"])
    assert "finished: all 1 epochs are trained; nothing to train. --epochs N continues" in capsys.readouterr().out
    state = out / "state"
    shutil.copy(state / "random_states_0.pkl", state / "random_states_1.pkl")  # as a 2-process run leaves it
    train.main(["--output-dir", str(out), "--resume"])
    assert "warning" not in capsys.readouterr().out  # nothing trains: another process count changes nothing
    root.rename(tmp_path / "moved")
    train.main(["--output-dir", str(out), "--resume", "--epochs", "2", "--data-dir", str(tmp_path / "moved")])
    printed = capsys.readouterr().out
    assert "was trained by 2 process(es), a global batch of 8; it goes on with 1, a global batch of 4" in printed
    assert (
        f"accelerate launch --multi_gpu --num_processes 2 train.py --output-dir {out} --resume --epochs 2 "
        f"--data-dir {tmp_path / 'moved'}" in printed
    )
    assert epochs_in(out) == [1, 2]


def test_extending_a_run_during_its_warmup_says_what_will_happen():
    # a run of 4 epochs with a 3-epoch warmup, stopped after epoch 1 and resumed with --epochs 8
    args = argparse.Namespace(epochs=8, schedule="cosine", lr=0.1, decay_start=None, output_dir="run")
    printed = train.extend_schedule(args, saved_epochs=4, epochs_done=1, steps_per_epoch=10, warmup_steps=30)
    assert "is still warming up: it rises from 0.0367" in printed
    assert "to 0.1 at epoch 3, then follows the cosine schedule to 0 at the new end, epoch 8" in printed


def test_resume_and_overwrite_together_are_refused_at_parse_time(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--output-dir", "run", "--resume", "--overwrite"])
    assert "pass one of them" in capsys.readouterr().err


def test_fp16_on_a_cpu_is_refused_instead_of_training_float32(tmp_path):
    """Also: under the launcher, a refusal is one error line before the launcher's own report (-q)."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--mixed_precision", "fp16", "-q", "train.py"]
    result = run_script(*launch, *quick_args(two_classes(tmp_path / "d"), tmp_path / "run"))
    assert result.returncode != 0 and one_error_line(result.stderr), result.stderr
    assert "--mixed_precision fp16 does not run on a CPU" in result.stderr and not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------- every image


def format_cases(folder):
    """{file: expected RGB of its centre}, one of each format and mode the scripts must read."""
    folder.mkdir(parents=True)
    red, cases = (200, 40, 40), {}

    def save(name, image, expected=red, **options):
        image.save(folder / name, **options)
        cases[name] = expected

    rgb = Image.new("RGB", (40, 40), red)
    for name in ("a.webp", "a.bmp", "a.tif", "a.tiff", "a.ppm", "a.PNG", "a.JPG"):
        save(name, rgb, **({"lossless": True} if name.endswith("webp") else {}))
    save("a.pgm", rgb.convert("L"), expected=(rgb.convert("L").getpixel((0, 0)),) * 3)
    save("gray.jpg", Image.new("L", (40, 40), 90), expected=(90, 90, 90))
    save("cmyk.jpg", Image.new("CMYK", (40, 40), (0, 255, 255, 0)), expected=(255, 0, 0))  # pure red
    palette = Image.new("P", (40, 40), 1)
    palette.putpalette([0, 255, 0, *red] + [0, 0, 0] * 254)
    palette.paste(0, (0, 0, 40, 20))  # the top half: colour 0, transparent
    save("palette.png", palette, transparency=0)
    save("frames.gif", rgb.convert("P"), save_all=True, append_images=[Image.new("RGB", (40, 40)).convert("P")])
    return cases


def test_every_format_and_mode_is_read_with_its_true_colours(tmp_path):
    cases = format_cases(tmp_path / "images")
    for name, expected in cases.items():
        pixels = data.read_image(tmp_path / "images" / name, 32)
        assert pixels is not None, name
        centre = pixels[24, 16].astype(int)  # the lower half: opaque in palette.png
        assert np.abs(centre - expected).max() <= 12, (name, centre, expected)
    top = data.read_image(tmp_path / "images" / "palette.png", 32)[2, 16]
    assert tuple(top) == data.TRANSPARENT_BACKGROUND  # not the green hidden under the transparent colour


def test_every_format_is_listed_and_other_files_are_counted(tmp_path, capsys):
    root = two_classes(tmp_path / "d", count=3)
    cases = format_cases(tmp_path / "formats")
    for name in cases:
        shutil.copy(tmp_path / "formats" / name, root / "train" / "ant" / f"x{name}")
    (root / "train" / "bee" / "notes.txt").write_text("not an image")
    (root / "train" / "bee" / "labels.csv").write_text("neither")
    _, labels, _ = data.list_images(root, "train")
    assert labels.tolist().count(0) == 3 + len(cases)
    said = capsys.readouterr().out
    assert "skipped 2 file(s) without an image extension (data.IMAGE_EXTENSIONS), e.g. labels.csv\n" in said


def broken_files(folder):
    """Files that made a decoder raise something other than OSError: a PNG with a broken chunk
    (SyntaxError), a header that is not one (ValueError), and malformed EXIF data (struct.error)."""
    folder.mkdir(parents=True, exist_ok=True)
    noise = np.random.default_rng(0).integers(0, 255, (400, 400, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "chunk.png")  # several IDAT chunks: break the second
    content = bytearray((folder / "chunk.png").read_bytes())
    second = content.find(b"IDAT", content.find(b"IDAT") + 4)
    content[second : second + 4] = b"\x00\x01\x02\x03"
    (folder / "chunk.png").write_bytes(bytes(content))
    (folder / "header.ppm").write_bytes(b"P6\n3u0 300\n255\n" + bytes(100))
    exif = bytes.fromhex(
        "4578696600004d4d002a000000080003015600020000000600000032011200030000000100060000876900040000"
        "fc0100000038000000004d616b657200000000650000"
    )
    Image.fromarray(noise[:40, :40]).save(folder / "exif.jpg", exif=exif)
    return ["chunk.png", "header.ppm", "exif.jpg"]


def raised_by(path):
    """What PIL raises when it opens, sizes, rotates and decodes path, as read_image does."""
    try:
        with Image.open(path) as image:
            min(image.size)
            ImageOps.exif_transpose(image).load()
    except Exception as error:
        return type(error)


def test_files_any_decoder_fails_on_are_skipped_and_named_in_train_and_evaluate(tmp_path, trained_run, capsys):
    root = two_classes(tmp_path / "d")
    broken = broken_files(root / "train" / "ant")
    raised = [raised_by(root / "train" / "ant" / name) for name in broken]
    assert raised == [SyntaxError, ValueError, struct.error]
    assert data.typical_side(data.list_images(root, "train")[0]) == 32  # the size probe survives them
    train.main(short_run(root, tmp_path / "run"))  # in-process: an exception would fail the test as a traceback
    printed = capsys.readouterr().out
    assert "unreadable image(s)" in printed and all(name in printed for name in broken)
    shutil.copy(root / "train" / "bee" / "000.png", tmp_path / "fine.png")
    checkpoint = trained_run / "best.safetensors"
    photos = [root / "train" / "ant", tmp_path / "fine.png", "--plot-dir", tmp_path / "plots"]
    evaluate.main([str(arg) for arg in [checkpoint, "--predict", *photos]])
    assert "skipped 3 unreadable image(s)" in capsys.readouterr().out


def test_small_images_keep_their_size_and_the_log_says_the_rule(tmp_path, capsys):
    for side, stored in ((28, 32), (32, 32), (50, 50), (64, 64)):
        args = train.parse_args(["--weights", "none"])
        assert "photos" not in train.data_settings(args, side)
        assert (args.image_size, args.input_size, args.train_crop) == (stored, stored, "padded")
    args = train.parse_args(["--stem", "imagenet"])
    train.data_settings(args, 50)
    assert (args.image_size, args.input_size) == (50, 50)  # at least the 48 torchvision's stem gets
    args = train.parse_args([])
    assert "photos" in train.data_settings(args, 65) and args.image_size == 256
    root = two_classes(tmp_path / "d", side=64)
    train.main([*short_run(root, tmp_path / "run"), "--input-size", "64"])
    assert "small images, kept at their size): stored: shorter side resized to 64" in capsys.readouterr().out


def test_a_misspelled_data_dir_is_no_such_folder_not_a_download(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    message = refused(quick_args(tmp_path / "dta", tmp_path / "run"))
    assert "dta: no such folder" in message and not (tmp_path / "dta").exists()
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "notes.txt").write_text("x")
    assert "neither train/<class>/ nor CIFAR-10 there" in refused(quick_args(tmp_path / "stuff", tmp_path / "run"))
    assert data.is_cifar10_location(tmp_path / "data")  # the default, made by the download
    (tmp_path / "empty").mkdir()
    assert data.is_cifar10_location(tmp_path / "empty") and not data.is_cifar10_location(tmp_path / "dta")


# ---------------------------------------------------------------------------------- nothing replaced


def test_plots_of_another_checkpoint_are_said_to_be_replaced(trained_run, image_folder, tmp_path, capsys):
    plots = tmp_path / "plots"
    evaluate_it = [str(trained_run / "best.safetensors"), "--data-dir", str(image_folder), "--plot-dir", str(plots)]
    evaluate.main(evaluate_it)
    evaluate.main(evaluate_it)  # the same checkpoint and split: replaced quietly
    assert "replaced" not in capsys.readouterr().out
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(trained_run / "best.safetensors", other / "best.safetensors")
    evaluate.main([str(other / "best.safetensors"), *evaluate_it[1:]])
    printed = capsys.readouterr().out
    assert "replaced 4 plot(s) of another checkpoint, split or set of images: best_test_confusion.png" in printed
    for folder in ("cat", "dog"):  # 5 images each: one contact sheet of the same name
        evaluate.main(
            [
                str(other / "best.safetensors"),
                "--predict",
                str(image_folder / "test" / folder),
                "--plot-dir",
                str(plots),
            ]
        )
    assert "replaced 1 plot(s)" in capsys.readouterr().out  # other images, the same sheet name


def test_overwrite_removes_the_old_runs_plots_and_names_what_it_keeps(tmp_path, capsys):
    root = two_classes(tmp_path / "d")
    out = tmp_path / "run"
    train.main(short_run(root, out))
    evaluate.main([str(out / "best.safetensors"), "--split", "val"])
    evaluate.main([str(out / "best.safetensors"), "--predict", str(root / "train")])
    (out / "notes.txt").write_text("mine")
    assert {"curves.png", "best_val_confusion.png", "best_predictions.png"} <= set(os.listdir(out))
    capsys.readouterr()
    train.main([*short_run(root, out), "--overwrite"])
    assert not list(out.glob("*.png")) and (out / "notes.txt").read_text() == "mine"
    assert "--overwrite: kept notes.txt, not files of the run or its plots" in capsys.readouterr().out


# ---------------------------------------------------------------------------------- pipes, processes, paths


# the first process late to its error line, as on a loaded machine: the launcher, which stops the others once
# one ends, stopped it before it said why when the second ended first
LATE_FIRST = """import os, sys, time
sys.path.insert(0, {root!r})
import train
leave = train.leave_process_group
def late():
    leave()
    time.sleep(2 if os.environ["RANK"] == "0" else 0)
train.leave_process_group = late
train.main()
"""


@pytest.mark.parametrize(
    "folder, batch, out, message",
    [
        ("d", 32, "run", "--batch-size 32 x 2 processes needs 64 training images a step, and there are 40"),
        ("missing", 16, "run", "no such folder"),
        ("d", 16, "/proc/run", "cannot write to /proc/run"),  # the main process alone makes the folder; late
    ],
)
def test_two_processes_refusing_the_input_say_it_once_without_a_traceback(tmp_path, folder, batch, out, message):
    """The main process refuses while the other waits for it: that one then meets the same refusal, or is
    told it, and ends quietly, not with a traceback of the connection the main process closed."""
    two_classes(tmp_path / "d", count=25)  # 40 training images after the split
    flags = quick_args(tmp_path / folder, tmp_path / out, "--batch-size", batch)
    script = "train.py"
    if out.startswith("/proc"):
        script = tmp_path / "late_first.py"
        script.write_text(LATE_FIRST.format(root=str(ROOT)))
    result = run_script(*launch(2, "-q"), str(script), *flags)
    assert result.returncode != 0 and result.stderr.count(message) == 1, both_ranks(result)
    assert "Traceback" not in result.stderr and "terminate called" not in result.stderr, both_ranks(result)
    assert not (tmp_path / "run").exists()


def test_a_dotdot_after_a_link_goes_where_the_system_goes_and_the_printed_commands_run(tmp_path, capsys):
    """link/.. is the parent of the link's target, not the folder holding the link: the run is found there,
    its data read from there, and the printed commands name those folders."""
    two_classes(tmp_path / "d")
    (tmp_path / "runs" / "sub").mkdir(parents=True)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "data").symlink_to(tmp_path / "d" / "train")
    (tmp_path / "x" / "out").symlink_to(tmp_path / "runs" / "sub")
    train.main(short_run(tmp_path / "x" / "data" / "..", tmp_path / "x" / "out" / ".." / "run"))
    printed = capsys.readouterr().out
    evaluate_command = shlex.split(printed.split("evaluate: ")[-1])
    assert evaluate_command[2:5] == [
        str(tmp_path / "runs" / "run" / "best.safetensors"),
        "--data-dir",
        str(tmp_path / "d"),
    ]
    assert (tmp_path / "runs" / "run" / "best.safetensors").is_file()
    train.main(["--output-dir", str(tmp_path / "x" / "out" / ".." / "run"), "--resume", "--epochs", "2"])
    assert epochs_in(tmp_path / "runs" / "run") == [1, 2]


def test_the_data_folder_is_recorded_absolute_for_evaluate_and_resume_elsewhere(tmp_path, monkeypatch, capsys):
    two_classes(tmp_path / "project" / "mydata")
    monkeypatch.chdir(tmp_path / "project")
    train.main(short_run("mydata", tmp_path / "run"))
    monkeypatch.chdir(tmp_path)
    evaluate.main([str(tmp_path / "run" / "best.safetensors"), "--split", "val", "--no-plots"])
    out = capsys.readouterr().out
    assert "the run's own data" in out and "(fitted on this split: optimistic)" in out
    train.main(["--output-dir", str(tmp_path / "run"), "--resume", "--epochs", "2"])
    assert epochs_in(tmp_path / "run") == [1, 2]


def test_ctrl_c_while_photos_decode_in_threads_stops_at_once(tmp_path):
    script = (
        "import sys, time, torch; sys.path.insert(0, '.'); import data\n"
        "data.read_image = lambda path, side: time.sleep(0.2)\n"  # 1,000 slow photos: 100 s on 2 threads
        "print('decoding', flush=True)\n"
        "data.decode(['photo.jpg'] * 1000, torch.zeros(1000, dtype=torch.long), torch.arange(1000), 256)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout.readline() == b"decoding\n"
    time.sleep(1)
    process.send_signal(signal.SIGINT)
    started = time.perf_counter()
    process.wait(timeout=30)
    assert time.perf_counter() - started < 5 and b"KeyboardInterrupt" in process.stderr.read()


def without_exit_barrier_race(output):
    """A machine's output without torch's report of a race of its own: once every process has ended, the
    launcher of machine 1 can find machine 0's, which holds the store, gone from the exit barrier and log
    "Error waiting on exit barrier" with a traceback (pytorch/pytorch#69520; seen in CI here, exit 0)."""
    if "Error waiting on exit barrier" not in output:
        return output
    return re.split(r"\n\[W[^]]*TCPStore\.cpp:\d+\] \[c10d\] recvValueWithTimeout failed", output)[0]


def test_two_machines_on_one_host_train_as_one_two_process_run(two_process_run, image_folder, tmp_path):
    """accelerate launch --num_machines 2, as machine ranks 0 and 1 on 127.0.0.1, one CPU process each:
    both end cleanly (no traceback, no "terminate called" at shutdown) and train what 2 processes on
    one machine train (the shared run of the same flags)."""
    flags = quick_args(image_folder, tmp_path / "machines", "--epochs", "1")
    machines = launch(2, "-q", "--num_machines", 2, "--main_process_ip", "127.0.0.1")  # one port for both
    environment = os.environ | {"PYTHONUNBUFFERED": "1"}
    ranks = [
        subprocess.Popen(
            [*machines, "--machine_rank", str(rank), "train.py", *flags],
            cwd=ROOT,
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [process.communicate(timeout=300)[0] for process in ranks]
    for process, output in zip(ranks, outputs):
        assert process.returncode == 0, "\n".join(outputs)
        ours = without_exit_barrier_race(output)
        assert "Traceback" not in ours and "terminate called" not in ours, "\n".join(outputs)
    one_machine, result = two_process_run
    assert result.returncode == 0, both_ranks(result)
    history, expected = (json.loads((run / "history.json").read_text()) for run in (tmp_path / "machines", one_machine))
    for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
        assert history[0][key] == pytest.approx(expected[0][key], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("script", ["train.py", "evaluate.py"])
def test_ctrl_c_while_a_script_starts_exits_quietly(script, tmp_path):
    process = subprocess.Popen([sys.executable, script, "--help"], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)  # within the imports of torch and the rest
    process.send_signal(signal.SIGINT)
    errors = process.communicate(timeout=60)[1]
    assert "Traceback" not in errors and "KeyboardInterrupt" not in errors, errors


# ---------------------------------------------------------------------------------- from the new-user review


def test_a_val_folder_holding_training_images_is_refused(tmp_path):
    root = two_classes(tmp_path / "d")
    os.symlink(root / "train", root / "val")  # validation would be the training set
    assert "validation would measure images the network trained on" in refused(quick_args(root, tmp_path / "run"))
    os.unlink(root / "val")
    two_classes(tmp_path / "other")  # other images: write_images seeds by the path's length
    (tmp_path / "other" / "train").rename(root / "val")
    os.link(root / "train" / "ant" / "000.png", root / "val" / "ant" / "hard.png")  # a hard link: one file too
    assert "1 image(s) of" in refused(quick_args(root, tmp_path / "run"))
    shutil.copy(root / "train" / "bee" / "001.png", root / "val" / "bee" / "copy.png")  # a copy of its bytes
    assert "2 image(s) of" in refused(quick_args(root, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_hard_links_and_a_class_folder_linked_to_another_are_one_image_and_refused(tmp_path, capsys):
    root = two_classes(tmp_path / "d", count=4)
    os.link(root / "train" / "ant" / "000.png", root / "train" / "ant" / "again.png")
    assert len(data.list_images(root, "train")[0]) == 8 and "skipped 1 link(s)" in capsys.readouterr().out
    os.symlink(root / "train" / "ant", root / "train" / "cat")
    with pytest.raises(data.UserError, match="cat is a link to .*ant: the same images under two classes"):
        data.list_images(root, "train")


def test_relative_paths_resume_from_anywhere_and_class_weights_stay_the_runs(tmp_path, monkeypatch, capsys):
    project = tmp_path / "project"
    two_classes(project / "d")
    monkeypatch.chdir(project)
    fake_run_checkpoint(project / "earlier", ["ant", "bee"], [0.9, 0.5])
    command = short_run("d", "run", "--class-weights", "earlier/history.json")
    train.main(command)
    first = capsys.readouterr().out
    assert "class weights: ant 0.333, bee 1.67" in first
    (project / "earlier" / "history.json").write_text(
        json.dumps([{"epoch": 1, "val_loss": 1, "val_per_class": [0.5, 0.9]}])
    )
    monkeypatch.chdir(tmp_path)  # elsewhere, the same paths spelled another way
    again = [arg.replace("earlier/", f"{project}/./earlier/") for arg in command]
    train.main([*again[2:], "--output-dir", str(project / "run"), "--resume", "--epochs", "2"])
    assert "class weights: ant 0.333, bee 1.67" in capsys.readouterr().out  # the run's, not the changed file's
    assert epochs_in(project / "run") == [1, 2]


def test_a_moved_data_folder_is_named_as_the_runs(tmp_path):
    root = two_classes(tmp_path / "d")
    train.main(short_run(root, tmp_path / "run"))
    root.rename(tmp_path / "moved")
    message = refused(["--output-dir", tmp_path / "run", "--resume", "--epochs", "2"])
    assert f"the run's data folder {root} does not exist any more (moved?)" in message
    message = refused([tmp_path / "run" / "best.safetensors", "--split", "val"], main=evaluate.main)
    assert "does not exist any more (moved?); pass --data-dir" in message
    assert "is a folder; pass a run's checkpoint: " in refused([tmp_path / "run"], main=evaluate.main)


def test_a_loss_of_zero_is_a_history_not_an_unreadable_one():
    history = [{"epoch": 1, "train_loss": 0.5, "train_acc": 0.9, "val_loss": 0.0, "val_acc": 1.0}]
    figures = evaluate.overfitting(history)
    assert figures["val_loss_increase_pct"] is None and figures["loss_ratio_best"] == 0.0
    history.append({"epoch": 2, "train_loss": 0.0, "train_acc": 1.0, "val_loss": 0.0, "val_acc": 1.0})
    assert evaluate.overfitting(history)["loss_ratio_last"] is None


def test_plots_of_another_test_folder_and_stale_contact_sheets_are_said(trained_run, image_folder, tmp_path, capsys):
    shutil.copytree(image_folder / "test", tmp_path / "other" / "test")
    shutil.copytree(image_folder / "train", tmp_path / "other" / "train")
    checkpoint, plots = str(trained_run / "best.safetensors"), str(tmp_path / "plots")
    evaluate.main([checkpoint, "--data-dir", str(image_folder), "--plot-dir", plots])
    evaluate.main([checkpoint, "--data-dir", str(tmp_path / "other"), "--plot-dir", plots])
    assert "replaced 4 plot(s)" in capsys.readouterr().out
    evaluate.main([checkpoint, "--predict", str(image_folder / "test"), "--plot-dir", plots])  # 50 images: 2 sheets
    Image.new("RGB", (8, 8)).save(tmp_path / "plots" / "best_predictions_mine.png")  # the user's: it stays
    shutil.copy(tmp_path / "plots" / "best_predictions_1.png", tmp_path / "plots" / "best_predictions_kept.png")
    evaluate.main([checkpoint, "--predict", str(image_folder / "test" / "cat"), "--plot-dir", plots])  # 5: one
    out = capsys.readouterr().out
    assert "removed best_predictions_1.png, best_predictions_2.png, drawn by an earlier evaluation: sheets of" in out
    kept = sorted(p.name for p in (tmp_path / "plots").glob("best_predictions*"))
    assert kept == ["best_predictions.png", "best_predictions_kept.png", "best_predictions_mine.png"]


def test_a_group_takes_the_classes_the_data_has():
    assert data.class_indices("vehicles", ["cat", "dog", "ship"]) == [2]
    with pytest.raises(data.UserError, match="the group vehicles .* has none of the classes"):
        data.class_indices("vehicles", ["cat", "dog"])


@pytest.fixture(scope="module")
def resumable_run(image_folder, tmp_path_factory):
    """A 1-epoch run whose constant lr leaves more epochs worth training."""
    out = tmp_path_factory.mktemp("resumable") / "run"
    train.main(quick_args(image_folder, out, "--epochs", "1", "--schedule", "constant"))
    return out


@pytest.mark.parametrize("damaged", ["progress.json", "optimizer.bin", "model.safetensors", "lost"])
def test_a_damaged_state_file_is_one_line_on_resume(resumable_run, tmp_path, damaged):
    shutil.copytree(resumable_run, tmp_path / "run")
    path = tmp_path / "run" / "state" / damaged
    if damaged == "lost":  # no progress.json at all
        path = path.with_name("progress.json")
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[:10])  # cut short, as by a full disk or a copy stopped halfway
    message = refused(["--output-dir", tmp_path / "run", "--resume", "--epochs", "3"])
    named = path if path.name == "progress.json" else path.parent  # accelerate's errors do not name the file
    assert f"{named} is damaged (" in message and "cannot be resumed" in message
    assert f"start a new run from its weights (--weights {tmp_path / 'run' / 'last.safetensors'})" in message
    (tmp_path / "run" / "last.safetensors").unlink()  # as before a first epoch ended: no weights to offer
    again = refused(["--output-dir", tmp_path / "run", "--resume", "--epochs", "3"])  # not 'another train.py is
    assert again.endswith("cannot be resumed; start a new run, or this one again with --overwrite")  # running'


def test_a_state_that_cannot_be_read_is_not_called_damaged(tmp_path):
    unreadable = PermissionError(13, "Permission denied", str(tmp_path / "state" / "progress.json"))
    message = train.damaged_state(tmp_path, tmp_path / "state", unreadable)
    assert (
        message
        == f"cannot read {tmp_path / 'state' / 'progress.json'} (Permission denied); make it readable, then resume"
    )
    assert "--overwrite" not in message  # it would delete a run that is whole
