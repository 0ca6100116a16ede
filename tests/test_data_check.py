"""evaluate.py --split val and train.py --resume only use the data the run was split from (#14)."""

import json
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CLASSES, class_images, quick_args
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

import data
import evaluate
import train


def evaluate_val(checkpoint, folder, tmp_path, *flags):
    out = tmp_path / "results.json"
    evaluate.main(
        [str(checkpoint), "--data-dir", str(folder), "--split", "val", "--no-plots", "--json", str(out), *flags]
    )
    return json.loads(out.read_text())


def another_folder(root):
    """The same classes and counts as image_folder, other images."""
    rng = np.random.default_rng(7)
    for label, name in enumerate(CLASSES):
        (root / "train" / name).mkdir(parents=True)
        for i, pixels in enumerate(class_images(label, 20, rng)):
            Image.fromarray(pixels).save(root / "train" / name / f"{i:04d}.png")
    return root


def changed_copies(image_folder, tmp_path):
    added, removed, renamed = (tmp_path / name for name in ("added", "removed", "renamed"))
    for copy in (added, removed, renamed):
        shutil.copytree(image_folder / "train", copy / "train")
    shutil.copy(added / "train" / "cat" / "0000.png", added / "train" / "cat" / "extra.png")
    (removed / "train" / "dog" / "0003.png").unlink()
    (renamed / "train" / "ship").rename(renamed / "train" / "boat")
    return [
        (added, "cat: 21 images, the run had 20"),
        (removed, "dog: 19 images, the run had 20"),
        (renamed, "classes"),
        (another_folder(tmp_path / "another"), "as many images per class, but other files"),
    ]


def test_val_split_of_the_runs_own_folder_passes_and_says_so(trained_run, image_folder, tmp_path):
    results = evaluate_val(trained_run / "best.safetensors", image_folder, tmp_path)
    assert results["data_check"] == "the run's own data" and results["num_samples"] == 40


def test_val_split_of_changed_data_is_refused_unless_overridden(trained_run, image_folder, tmp_path, capsys):
    checkpoint = trained_run / "best.safetensors"
    for folder, difference in changed_copies(image_folder, tmp_path):
        with pytest.raises(SystemExit) as refused:
            evaluate_val(checkpoint, folder, tmp_path)
        message = str(refused.value.code)
        assert message.startswith("error: ") and difference in message and len(message.splitlines()) == 1
        assert "or --split val" not in message  # given already
    assert not (tmp_path / "results.json").exists()
    results = evaluate_val(checkpoint, tmp_path / "added", tmp_path, "--skip-data-check")
    assert results["data_check"] == "skipped (--skip-data-check): cat: 21 images, the run had 20"
    assert "(fitted on the run's validation split: optimistic if these are its images)" in capsys.readouterr().out


def test_a_checkpoint_without_a_fingerprint_evaluates_with_a_warning(trained_run, image_folder, tmp_path, capsys):
    old = tmp_path / "old.safetensors"
    with safe_open(trained_run / "best.safetensors", "pt") as file:
        metadata, tensors = file.metadata(), {key: file.get_tensor(key) for key in file.keys()}
    config = json.loads(metadata["config"])
    del config["data_fingerprint"]
    save_file(tensors, old, metadata=metadata | {"config": json.dumps(config)})
    results = evaluate_val(old, image_folder, tmp_path)
    assert results["data_check"].startswith("unchecked")
    out = capsys.readouterr().out
    assert sum(line.startswith("warning: ") for line in out.splitlines()) == 1
    assert "(fitted on the run's validation split: optimistic if these are its images)" in out


def test_the_test_split_is_not_checked(trained_run, image_folder, tmp_path):
    shutil.copytree(image_folder / "test", tmp_path / "other" / "test")
    shutil.copytree(image_folder / "train", tmp_path / "other" / "train")
    (tmp_path / "other" / "train" / "cat" / "0000.png").unlink()
    out = tmp_path / "r.json"
    evaluate.main(
        [str(trained_run / "best.safetensors"), "--data-dir", str(tmp_path / "other"), "--json", str(out), "--no-plots"]
    )
    assert json.loads(out.read_text())["num_samples"] == 50


def test_resume_refuses_other_data_and_takes_the_same_data_moved(image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    train.main(quick_args(image_folder, out, "--epochs", "1", "--schedule", "constant"))
    removed = changed_copies(image_folder, tmp_path)[1][0]
    with pytest.raises(
        SystemExit, match="is not the data this run was split from \\(dog: 19 images, the run had 20\\)"
    ):
        train.main(["--output-dir", str(out), "--resume", "--epochs", "2", "--data-dir", str(removed)])
    moved = tmp_path / "moved"
    shutil.copytree(image_folder, moved)
    train.main(["--output-dir", str(out), "--resume", "--epochs", "2", "--data-dir", str(moved)])
    assert f"data: {moved} holds the run's data" in capsys.readouterr().out
    assert [r["epoch"] for r in json.loads((out / "history.json").read_text())] == [1, 2]


def test_the_fingerprint_ignores_listing_order_and_hashes_cifar_pixels(image_folder, tmp_path):
    paths, labels, classes = data.list_images(image_folder, "train")
    first = data.fingerprint(image_folder, paths, labels, classes)
    assert first == data.fingerprint(image_folder, paths[::-1], labels, classes)  # the folder's listing, sorted
    assert first["images_per_class"] == dict.fromkeys(CLASSES, 20) and len(json.dumps(first)) < 300
    pixels = torch.zeros(4, 3, 32, 32, dtype=torch.uint8)
    cifar = data.fingerprint(tmp_path, pixels, torch.tensor([0, 0, 1, 1]), ["a", "b"])
    pixels[0, 0, 0, 0] = 1
    assert data.data_difference(cifar, data.fingerprint(tmp_path, pixels, torch.tensor([0, 0, 1, 1]), ["a", "b"]))


def test_images_swapped_between_training_and_validation_are_found(tmp_path):
    rng = np.random.default_rng(0)
    for label, name in enumerate(["cat", "dog"]):  # BMPs: every file of a size the listing cannot tell apart
        (tmp_path / "d" / "train" / name).mkdir(parents=True)
        for i, pixels in enumerate(class_images(label, 10, rng)):
            pixels[:12] = pixels[-12:] = 255  # white margins: the files' first and last bytes are alike
            Image.fromarray(pixels).save(tmp_path / "d" / "train" / name / f"{i}.bmp")
    paths, labels, classes = data.list_images(tmp_path / "d", "train")
    before = data.fingerprint(tmp_path / "d", paths, labels, classes)
    _, val = data.train_val_indices(labels, classes, 0.2, 0)
    held_out, trained = paths[val[0]], paths[next(i for i in range(len(paths)) if i not in val.tolist())]
    swap = tmp_path / "swap.bmp"
    for source, target in ((held_out, swap), (trained, held_out), (swap, trained)):
        shutil.move(source, target)
    after = data.fingerprint(tmp_path / "d", paths, labels, classes)
    assert after["sha256"] == before["sha256"]  # the same names and sizes
    assert "but other contents: images swapped or replaced" in data.data_difference(before, after)
    edited = bytearray(Path(trained).read_bytes())
    edited[len(edited) // 2] ^= 1  # one bit in the middle of the pixels, the size unchanged
    Path(trained).write_bytes(edited)
    assert data.data_difference(after, data.fingerprint(tmp_path / "d", paths, labels, classes))


def test_a_run_validated_on_its_val_folder_is_not_evaluated_on_a_cut_of_train(image_folder, tmp_path):
    shutil.copytree(image_folder / "train", tmp_path / "d" / "train")
    shutil.copytree(image_folder / "test", tmp_path / "d" / "val")
    train.main(quick_args(tmp_path / "d", tmp_path / "run", "--epochs", "1"))
    (tmp_path / "d" / "val").rename(tmp_path / "d" / "val-hidden")
    for flags in ([], ["--skip-data-check"]):  # a cut of train/ would be images the run trained on
        with pytest.raises(SystemExit) as refused:
            evaluate_val(tmp_path / "run" / "best.safetensors", tmp_path / "d", tmp_path, *flags)
        assert "the run validated on its val/ folder, which is not there" in str(refused.value.code)
        assert "--skip-data-check" not in str(refused.value.code)
    with pytest.raises(SystemExit, match="validated on its val/ folder, which is not there"):
        train.main(["--output-dir", str(tmp_path / "run"), "--resume", "--epochs", "2"])


def test_the_data_check_reads_a_val_folder_the_same_however_its_folder_is_spelled(image_folder, tmp_path, monkeypatch):
    shutil.copytree(image_folder / "train", tmp_path / "d" / "train")
    shutil.copytree(image_folder / "test", tmp_path / "d" / "val")

    def found(root):
        items, labels, classes = data.list_images(root, "train")
        return data.validation_folder_sources(root, data.val_folder_in(root), items, labels, classes, None, 0)[1]

    recorded = found(tmp_path / "d")  # train.py records it from the absolute path
    monkeypatch.chdir(tmp_path / "d")
    assert found(Path(".")) == recorded and found(Path("../d")) == recorded  # evaluate.py --data-dir .


def test_a_val_folder_added_after_a_run_that_cut_its_own_says_to_move_it(image_folder, tmp_path):
    items, labels, classes = data.list_images(image_folder, "train")
    cut = data.fingerprint(image_folder, items, labels, classes)
    added = dict(cut, val_folder="val")
    assert data.data_difference(cut, added).endswith("this folder has a val/ it never used: move val/ out of it")


def test_a_resume_stopped_after_the_data_moved_prints_a_command_that_finds_it(
    image_folder, tmp_path, monkeypatch, capsys
):
    shutil.copytree(image_folder, tmp_path / "first")
    out = tmp_path / "run"
    train.main(quick_args(tmp_path / "first", out, "--epochs", "1", "--schedule", "constant"))
    moved, cache = tmp_path / "moved data", tmp_path / "new cache"  # spaces: the command is quoted for a shell
    (tmp_path / "first").rename(moved)
    monkeypatch.chdir(tmp_path)  # the printed command runs from wherever this one did
    anew = ["--epochs", "2", "--data-dir", str(moved), "--cache-dir", str(cache), "--data-on", "device"]
    with monkeypatch.context() as patched:
        patched.setattr(train, "train_epoch", lambda *args: None)  # stopped, as by Ctrl-C, before epoch 2 ends
        with pytest.raises(SystemExit) as stopped:
            train.main(["--output-dir", str(out), "--resume", *anew])
    assert stopped.value.code == 130
    printed = capsys.readouterr().out.splitlines()
    command = printed[printed.index(next(line for line in printed if line.startswith("stopped during epoch 2"))) + 1]
    assert command.endswith(shlex.join(["--resume", *anew]))  # its state: 1 epoch, the old place and cache
    words = shlex.split(command)
    script = next(word for word in words if word.endswith("train.py"))
    assert Path(script).resolve() == Path(train.__file__).resolve()
    train.main(words[words.index(script) + 1 :])
    assert [r["epoch"] for r in json.loads((out / "history.json").read_text())] == [1, 2]
    config = json.loads((out / "state" / "progress.json").read_text())["config"]
    assert (config["cache_dir"], config["data_on"]) == (str(cache), "device")  # the resume's, not the run's


def test_a_run_validated_on_its_val_folder_checks_those_images_alone(image_folder, tmp_path):
    shutil.copytree(image_folder / "train", tmp_path / "d" / "train")
    shutil.copytree(image_folder / "test", tmp_path / "d" / "val")
    checkpoint = tmp_path / "run" / "best.safetensors"
    train.main(quick_args(tmp_path / "d", tmp_path / "run", "--epochs", "1", "--schedule", "constant"))
    shutil.copy(tmp_path / "d" / "train" / "cat" / "0000.png", tmp_path / "d" / "train" / "cat" / "extra.png")
    # train/ changed around it: the validation split is the same images, trained on none
    assert evaluate_val(checkpoint, tmp_path / "d", tmp_path)["data_check"] == "the run's own data"
    with pytest.raises(SystemExit) as refused:  # a resumed run would train on other data: refused
        train.main(["--output-dir", str(tmp_path / "run"), "--resume", "--epochs", "2"])
    assert "cat: 26 images, the run had 25 (train/ and val/ together)" in str(refused.value.code)
    assert "restore its images, or pass --data-dir DIR where they are" in str(refused.value.code)
    (tmp_path / "d" / "val" / "cat" / "0000.jpg").unlink()
    with pytest.raises(SystemExit) as refused:
        evaluate_val(checkpoint, tmp_path / "d", tmp_path)
    assert "(in val/: cat: 4 images, the run had 5)" in str(refused.value.code)
    assert "Restore the run's images, or pass --data-dir DIR where they are, or --skip-data-check" in str(
        refused.value.code
    )
    (tmp_path / "d" / "val").rename(tmp_path / "d" / "valid")
    with pytest.raises(SystemExit, match=r"its val/ folder, which is not there \(this folder has valid/\)"):
        evaluate_val(checkpoint, tmp_path / "d", tmp_path)
