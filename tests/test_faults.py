"""train.py one step off the happy path: bad flags and splits, odd images, a run folder left by a
crash, a full disk, two runs at once, a diverging run, and a stopped launcher."""

import errno
import fcntl
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import ROOT, quick_args, run_script
from PIL import Image
from safetensors import SafetensorError

import data
import model
import train


def one_error_line(stderr):
    return "Traceback" not in stderr and sum("error:" in line for line in stderr.splitlines()) == 1


@pytest.mark.parametrize(
    "flag, value, allowed",
    [
        ("--batch-size", "0", "at least 2"),
        ("--lr", "-1", "above 0"),
        ("--crop-padding", "-1", "at least 0"),
        ("--label-smoothing", "2", "below 1"),
        ("--epochs", "0", "at least 1"),
        ("--val-fraction", "1", "below 1"),
        ("--momentum", "nan", "below 1"),
        ("--weight-decay", "-0.1", "at least 0"),
        ("--warmup-epochs", "inf", "at least 0"),
        ("--input-size", "4", "at least 8"),
        ("--patience", "0", "at least 1"),
        ("--ema", "1", "below 1"),
        ("--max-train-samples", "ten", "not an integer"),
        ("--seed", "-1", "at least 0"),
    ],
)
def test_numeric_flags_are_range_checked_at_parse_time(flag, value, allowed, capsys):
    with pytest.raises(SystemExit) as stopped:
        train.parse_args([flag, value])
    assert stopped.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"error: argument {flag}: " in message and allowed in message


def test_resume_without_an_output_dir_is_refused_before_any_folder_is_made(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        train.parse_args(["--resume"])
    assert "--resume needs --output-dir" in capsys.readouterr().err and not list(tmp_path.iterdir())


def test_resume_takes_the_starting_command_refuses_changed_settings_and_needs_no_weights_file(
    weights_file, image_folder, tmp_path
):
    weights = tmp_path / "weights.pth"
    shutil.copy(weights_file, weights)
    out = tmp_path / "run"
    started = quick_args(image_folder, out, "--epochs", "1", "--schedule", "constant", "--weights", weights)
    started += ["--class-weights", "1,2" + ",1" * 8, "--targeted-augment", "cat,dog"]
    train.main(started)
    weights.unlink()  # the state holds the weights now
    with pytest.raises(SystemExit) as refusal:
        train.main([*started, "--resume", "--lr", "0.01", "--batch-size", "8", "--patience", "3"])
    message = str(refusal.value.code)
    assert message.startswith("error: --resume continues the run with its own settings")
    assert "--batch-size 8 (the run's: 16); --lr 0.01 (the run's: 0.05) differ" in message
    assert "--patience 3 (the run's: not set)" in message  # not Python's None
    # the same values written otherwise: weights scale to mean 1, classes in any order (refused as differing)
    respelt = [*started[:-4], "--class-weights", "0.5,1.0" + ",0.5" * 8, "--targeted-augment", "dog,cat"]
    with pytest.raises(SystemExit, match="--class-weights 0.5,2"):
        train.main([*respelt[:-3], "0.5,2" + ",0.5" * 8, *respelt[-2:], "--resume", "--epochs", "2"])
    train.main([*respelt, "--resume", "--epochs", "2"])  # up-arrow, add --resume: every other flag is the run's
    assert epochs_in(out) == [1, 2]


def test_a_bad_flag_from_the_command_line_is_one_line_and_writes_nothing(tmp_path):
    result = run_script(sys.executable, "train.py", "--output-dir", str(tmp_path / "out"), "--batch-size", "0")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if "error:" in line] == [
        "error: argument --batch-size: must be an integer at least 2, got 0 (train.py --help lists the flags)"
    ]
    assert "usage:" not in result.stderr  # the one line alone, not after argparse's usage block
    assert not (tmp_path / "out").exists()


def tiny_folder(root, per_class, classes=("ant", "bee", "cat")):
    for label, name in enumerate(classes):
        (root / "train" / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (32, 32), (label * 80, i * 5, 0)).save(root / "train" / name / f"{i}.png")
    return root


@pytest.mark.parametrize(
    "per_class, flags, message",
    [
        (20, ["--val-fraction", "0.99"], "would have 0 training and 20 validation images"),
        (2, [], "would have 2 training and 0 validation images"),
        (20, ["--max-train-samples", "1"], "raise --max-train-samples (at least 3"),
    ],
)
def test_splits_that_leave_a_class_empty_are_refused_with_the_numbers(tmp_path, per_class, flags, message):
    folder = tiny_folder(tmp_path / "data", per_class)
    with pytest.raises(SystemExit, match=message.replace("(", r"\(")):
        train.main(quick_args(folder, tmp_path / "out", *flags))
    assert not (tmp_path / "out").exists()


def test_a_batch_size_above_the_training_images_is_refused(tmp_path):
    folder = tiny_folder(tmp_path / "data", 5)
    with pytest.raises(SystemExit, match="--batch-size 16 needs 16 training images a step, and there are 12"):
        train.main(quick_args(folder, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_a_huge_batch_size_is_refused_from_the_listing_before_any_image_is_read(tmp_path, capsys):
    """Not taken for data too big for memory (its activations are), and refused before the cache is built."""
    folder, cache = tiny_folder(tmp_path / "data", 5), tmp_path / "cache"
    flags = ["--weights", "none", "--batch-size", "100000", "--cache-dir", str(cache), "--data-on", "auto"]
    with pytest.raises(SystemExit, match="--batch-size 100000 needs 100000 training images a step, and there are 12"):
        train.main(["--data-dir", str(folder), "--output-dir", str(tmp_path / "out"), *flags])
    assert "fit in memory" not in capsys.readouterr().out and not cache.exists()


def test_a_last_batch_of_one_image_trains_and_the_printed_evaluate_command_works(image_folder, tmp_path, capsys):
    """160 training images at batch 53 leave one over; at 32x32 torchvision's stem ends in a 1x1 map, where
    BatchNorm cannot train on one image. That image is dropped for the epoch. This folder has no test/."""
    shutil.copytree(image_folder / "train", tmp_path / "my data" / "train")
    out = tmp_path / "my run"  # spaces: the printed command quotes them; its `..` goes
    given = tmp_path / "elsewhere" / ".." / "my run"
    (tmp_path / "elsewhere").mkdir()
    train.main(
        quick_args(tmp_path / "my data", given, "--batch-size", "53", "--max-train-samples", "160", "--epochs", "1")
    )
    command = shlex.split(capsys.readouterr().out.split("evaluate: ")[-1])
    assert command[:3] == ["python", "evaluate.py", f"{out}/best.safetensors"] and "--split" in command
    result = run_script(sys.executable, *command[1:], "--no-plots", "--json", str(tmp_path / "r.json"))
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "r.json").read_text())["num_samples"] == 40


def test_16_bit_png_loads_with_its_true_values(tmp_path):
    for name, level in (("dark", 8000), ("light", 50000)):
        (tmp_path / "train" / name).mkdir(parents=True)
        Image.fromarray(np.full((32, 32), level, dtype=np.uint16)).save(tmp_path / "train" / name / "0.png")
    images, labels, classes = data.load_images(tmp_path, "train")
    by_class = {classes[label]: image for image, label in zip(images, labels)}
    assert by_class["dark"].unique().tolist() == [8000 // 256]  # not clipped to white
    assert by_class["light"].unique().tolist() == [50000 // 256]


def test_a_failed_cifar_download_leaves_no_data_folder(tmp_path, monkeypatch):
    import torchvision

    def offline(self):
        Path(self.root).mkdir(parents=True, exist_ok=True)  # as torchvision does before downloading
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", offline)
    monkeypatch.chdir(tmp_path)  # ./data, the default: the one folder CIFAR-10 is downloaded into unasked
    with pytest.raises(data.UserError, match="could not be downloaded"):
        data.load_images("data", "train")
    assert not (tmp_path / "data").exists()


@pytest.fixture
def finished_run(image_folder, tmp_path):
    out = tmp_path / "run"
    train.main(quick_args(image_folder, out, "--epochs", "1"))
    return out


def epochs_in(out):
    return [r["epoch"] for r in json.loads((out / "history.json").read_text())]


@pytest.mark.parametrize(
    "crash",
    [
        "state-old beside state",  # a crash while removing the previous state
        "state-tmp half written",  # a crash while writing the new one
        "only state-tmp and state-old",  # a crash between the two renames
        "only state-old",  # the same, before the new state was complete
    ],
)
def test_a_crash_at_any_point_of_a_save_leaves_a_resumable_folder(finished_run, crash):
    state = finished_run / "state"
    if crash == "state-old beside state":
        shutil.copytree(state, finished_run / "state-old")
    elif crash == "state-tmp half written":
        shutil.copytree(state, finished_run / "state-tmp")
        (finished_run / "state-tmp" / "progress.json").unlink()
        (finished_run / "state-tmp" / "model.safetensors").rename(finished_run / "state-tmp" / ".tmpzE3dCt")  # kill -9
    elif crash == "only state-tmp and state-old":
        shutil.copytree(state, finished_run / "state-old")
        state.rename(finished_run / "state-tmp")
    else:
        state.rename(finished_run / "state-old")
    with pytest.raises(SystemExit, match="already holds a run; pass --resume"):  # a plain rerun explains
        train.main(quick_args(finished_run.parent, finished_run))
    train.main(["--output-dir", str(finished_run), "--resume", "--epochs", "2"])
    assert epochs_in(finished_run) == [1, 2]
    assert sorted(p.name for p in finished_run.glob("state*")) == ["state"]


def test_a_save_waits_for_every_rank_before_swapping_the_state_in(tmp_path):
    """A slower rank writes its random_states_1.pkl into state-tmp while rank 0 is done: the rename
    must wait for it (CI saw rank 1 fail with "Parent directory .../state-tmp does not exist")."""

    class TwoRanks:  # rank 0's view; rank 1 finishes its file at the next barrier
        is_main_process, rank1_pending = True, False

        def save_state(self, folder):
            Path(folder).mkdir(parents=True, exist_ok=True)
            (Path(folder) / "random_states_0.pkl").write_bytes(b"0")
            self.rank1_pending = True

        def wait_for_everyone(self):
            if self.rank1_pending:
                (tmp_path / "state-tmp" / "random_states_1.pkl").write_bytes(b"1")  # raises if renamed away
                self.rank1_pending = False

    train.save_state(TwoRanks(), tmp_path, {"history": []})
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == [
        "progress.json",
        "random_states_0.pkl",
        "random_states_1.pkl",
    ]


def test_an_empty_state_tmp_left_by_a_crash_before_the_first_save_does_not_block(image_folder, tmp_path):
    out = tmp_path / "run"
    (out / "state-tmp").mkdir(parents=True)
    with pytest.raises(SystemExit, match="nothing to resume"):
        train.main(["--output-dir", str(out), "--resume"])
    train.main(quick_args(image_folder, out, "--epochs", "1"))
    assert epochs_in(out) == [1]


def test_output_dir_problems_are_one_line_errors(image_folder, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("mine")
    cases = ((blocker, "is a file, not a folder; pass another --output-dir"), (blocker / "run", "a-file is a file"))
    for out, message in (*cases, ("/proc/run", "cannot write to")):
        with pytest.raises(SystemExit, match=f"^error: .*{message}"):
            train.main(quick_args(image_folder, out))
    assert blocker.read_text() == "mine"


@pytest.mark.parametrize(
    "failure, advice",
    [
        (OSError(errno.ENOSPC, "No space left on device"), "No space left on device.*Free space, then resume"),
        (
            SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
            "No space left on device.*Free space, then resume",
        ),
        (PermissionError(errno.EACCES, "Permission denied"), "Permission denied.*Make the folder writable, then"),
    ],
)
def test_a_failed_write_keeps_the_last_good_files_and_resume_continues(
    image_folder, tmp_path, monkeypatch, failure, advice
):
    out = tmp_path / "run"

    def failing_in_epoch_2(model, path, metadata):
        if metadata["epoch"] == 2:
            raise failure
        real_save(model, path, metadata)

    real_save = train.save_checkpoint
    monkeypatch.setattr(train, "save_checkpoint", failing_in_epoch_2)
    with pytest.raises(SystemExit, match=advice):
        train.main(quick_args(image_folder, out, "--epochs", "3"))
    monkeypatch.undo()
    assert model.load_checkpoint(out / "last.safetensors")[1]["epoch"] == 1
    train.main(["--output-dir", str(out), "--resume"])
    assert epochs_in(out) == [1, 2, 3]


def test_a_state_torch_save_could_not_write_is_one_line_and_resume_continues(image_folder, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_save_state = train.Accelerator.save_state

    def full_in_epoch_2(accelerator, folder):  # history.json is written just before the state
        if (out / "history.json").is_file() and len(json.loads((out / "history.json").read_text())) == 2:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 949568 vs 949464")
        real_save_state(accelerator, folder)

    monkeypatch.setattr(train.Accelerator, "save_state", full_in_epoch_2)
    with pytest.raises(SystemExit) as refused:  # torch.save's writer says no why: the message says what it can
        train.main(quick_args(image_folder, out, "--epochs", "3"))
    assert re.fullmatch(
        rf"error: could not write to {out} \(torch.save failed, \d+ MB free there\); the files written before are "
        r"whole. Free space, or make it writable, then resume: .*",
        refused.value.code,
    )
    monkeypatch.undo()
    train.main(["--output-dir", str(out), "--resume"])
    assert epochs_in(out) == [1, 2, 3]


def test_a_second_run_in_a_locked_folder_is_refused_and_a_stale_lock_file_is_not(image_folder, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running train.py holds it
        with pytest.raises(SystemExit, match="another train.py is running in"):
            train.main(quick_args(image_folder, out, "--epochs", "1"))
    assert not (out / "history.json").exists()
    train.main(quick_args(image_folder, out, "--epochs", "1"))  # the file is still there, the lock is not
    assert epochs_in(out) == [1]


def test_a_busy_finished_run_says_so_before_loading_any_data(image_folder, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train.main(quick_args(image_folder, out, "--epochs", "1"))
    monkeypatch.setattr(data, "load_split", lambda *a, **k: pytest.fail("the data was loaded"))
    with open(out / ".lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # not "already holds a run; pass --resume": resuming would not help either
        for argv in (quick_args(image_folder, out), ["--output-dir", str(out), "--resume", "--epochs", "2"]):
            with pytest.raises(SystemExit, match="another train.py is running in"):
                train.main(argv)


def test_default_run_folders_started_in_the_same_second_differ(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first, second = train.new_run_dir(), train.new_run_dir()
    assert first != second and first.is_dir() and second.is_dir()


def test_extending_a_run_continues_its_decay_and_says_so(image_folder, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    train.main(quick_args(image_folder, out, "--epochs", "2", "--lr", "0.1", "--warmup-epochs", "0"))
    progress_file = out / "state" / "progress.json"
    progress = json.loads(progress_file.read_text())
    with monkeypatch.context() as patched:  # a finished cosine run: refused before its data is read
        patched.setattr(data, "load_split", lambda *a, **k: pytest.fail("the data was loaded"))
        with pytest.raises(SystemExit, match="brought the learning rate to 0, so more epochs would not change it"):
            train.main(["--output-dir", str(out), "--resume", "--epochs", "4"])
    del progress["history"][-1]["lr"]  # a history from before the lr was recorded: the schedule says it
    progress_file.write_text(json.dumps(progress))
    with pytest.raises(SystemExit, match="brought the learning rate to 0, so more epochs would not change it"):
        train.main(["--output-dir", str(out), "--resume", "--epochs", "4"])
    progress["config"]["epochs"] = 4  # as if the run had been planned for 4 epochs
    progress_file.write_text(json.dumps(progress))
    train.main(["--output-dir", str(out), "--resume", "--epochs", "6"])
    assert "--epochs 6 instead of 4: after epoch 2 the learning rate goes on from 0.05" in capsys.readouterr().out
    rates = [r["lr"] for r in json.loads((out / "history.json").read_text())[2:]]
    assert 0.05 > rates[0] > rates[1] > rates[2] > rates[3] >= 0  # no jump back up, down to 0 at the new end
    # the new decay starts where the old one stood
    args = SimpleNamespace(epochs=4, schedule="cosine", lr=0.1, decay_start=None, output_dir="run")
    train.extend_schedule(args, saved_epochs=2, epochs_done=1, steps_per_epoch=10, warmup_steps=0)
    assert train.lr_factor(10, 40, 0, "cosine", args.decay_start) == pytest.approx(train.lr_factor(10, 20, 0, "cosine"))
    assert train.lr_factor(40, 40, 0, "cosine", args.decay_start) == pytest.approx(0)


def test_a_run_whose_validation_loss_is_never_finite_fails(image_folder, tmp_path, monkeypatch):
    real_validate = train.validate

    def not_finite(*args):
        scores, logits, labels = real_validate(*args)
        return scores | {"val_loss": float("nan")}, logits, labels

    monkeypatch.setattr(train, "validate", not_finite)
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match="validation loss is nan after epoch 1; no checkpoint was saved. Lower --lr"):
        train.main(quick_args(image_folder, out))
    assert not (out / "best.safetensors").exists()


def test_files_get_the_users_usual_permissions(finished_run):
    umask = os.umask(0)
    os.umask(umask)
    for path in (finished_run / "best.safetensors", finished_run / "history.json", finished_run / "state"):
        for file in [path] if path.is_file() else path.iterdir():
            assert file.stat().st_mode & 0o777 == 0o666 & ~umask, file


def test_help_shows_every_flag_with_its_default(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for shown in (
        "(default 30, seed 50, cpu 16)",
        "peak; 0.2 with --weights none (but seed); photos: x --batch-size/128 (default",
    ):
        assert shown in text
    assert "--mixed_precision bf16 train.py" in text  # the launcher's flags go before the script
    import evaluate

    with pytest.raises(SystemExit):
        evaluate.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert all(shown in text for shown in ("image folder (default: the run's", "split (test)", ">= 1 (1024 at 32x32"))


def test_the_time_estimate_warns_about_the_cifar_stem_on_a_cpu():
    cpu = SimpleNamespace(device=torch.device("cpu"))
    slow = train.time_estimate(660, 1, SimpleNamespace(epochs=30, stem="cifar", small_epochs=0), cpu)
    assert slow.startswith("estimate: 11.0 min an epoch, 5.5 h for the 30 left") and "--recipe cpu" in slow
    assert "--recipe cpu" not in train.time_estimate(
        60, 1, SimpleNamespace(epochs=30, stem="imagenet", small_epochs=0), cpu
    )
    grows = SimpleNamespace(epochs=15, stem="imagenet", small_epochs=10, image_size=32, input_size=64)
    assert train.time_estimate(60, 1, grows, cpu) == (
        "estimate: 1.0 min an epoch, 0.2 h for the 10 left at 32x32; the 5 at 64x64 after them take longer"
    )


def running(pid):
    """Alive and not a zombie waiting to be reaped (a container's first process may never reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_sigterm_to_accelerate_launch_stops_the_trainer_with_its_state_saved(image_folder, tmp_path):
    out = tmp_path / "run"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "train.py"]
    flags = quick_args(image_folder, out, "--epochs", "50", "--batch-size", "4")
    launcher = subprocess.Popen(
        [*launch, *flags], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    while launcher.poll() is None and not (out / "history.json").exists():
        time.sleep(0.1)
    trainer = int(Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()[0])
    launcher.send_signal(signal.SIGTERM)
    try:
        output = launcher.communicate(timeout=60)[0]  # the trainer holds the pipe open until it ends
        deadline = time.time() + 30
        while running(trainer) and time.time() < deadline:  # closing the pipe is not quite the end
            time.sleep(0.1)
    finally:
        if running(trainer):
            os.kill(trainer, signal.SIGKILL)
            pytest.fail("the trainer outlived its launcher")
    assert "stopped during epoch" in output and "--resume" in output, output[-2000:]
    assert data.latest_state(out) == out / "state" and len(epochs_in(out)) < 50


def test_odd_data_dirs_and_images_are_refused_or_skipped(tmp_path, image_folder):
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(data.UserError, match="is a file; pass a folder"):
        data.load_images(tmp_path / "a-file", "train")
    with pytest.raises(data.UserError, match=f"is a split.s folder; pass the folder that holds it, {image_folder}"):
        data.load_images(image_folder / "train", "train")  # the class folders, one level too deep
    folder = tiny_folder(tmp_path / "data", 3)
    (folder / "train" / "ant" / "broken.png").symlink_to(tmp_path / "nowhere.png")
    (folder / "train" / ".ipynb_checkpoints").mkdir()  # Jupyter's, not a class
    images, labels, classes = data.load_images(folder, "train")  # the broken link is skipped and counted
    assert len(images) == 9 and classes == ["ant", "bee", "cat"]
    paths, labels, classes = data.list_images(folder, "train")
    assert data.fingerprint(folder, paths, labels, classes)["images_per_class"]["ant"] == 4  # files, as listed


def test_a_failed_download_removes_every_folder_it_made(tmp_path, monkeypatch):
    import torchvision

    def offline(self):
        Path(self.root).mkdir(parents=True, exist_ok=True)
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", offline)
    with pytest.raises(data.UserError):
        data.load_images(tmp_path / "new" / "cifar", "train")
    assert list(tmp_path.iterdir()) == []
