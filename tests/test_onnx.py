"""evaluate.py --export-onnx: the graph from uint8 pixels to logits, its metadata and its check."""

import builtins
import json
import shutil

import numpy as np
import pytest
import torch

import evaluate
from model import build_model, save_checkpoint

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")

CLASSES = ["airplane", "automobile", "bird", "cat"]
# (stem, stored side, evaluation crop, network input, two-stage groups): CIFAR-sized at the cifar stem,
# upsampled for torchvision's, photos cropped in the graph, and the two-stage head
CASES = {
    "cifar-stem": ("cifar", 32, 32, 32, None),
    "imagenet-stem": ("imagenet", 32, 32, 48, None),
    "photos": ("imagenet", 72, 64, 64, None),
    "two-stage": ("imagenet", 32, 32, 32, [[0, 1], [2, 3]]),
}


def checkpoint(folder, case):
    stem, side, crop, size, groups = CASES[case]
    torch.manual_seed(0)
    model = build_model(len(CLASSES), stem, "none", groups)
    metadata = dict(arch="resnet18", stem=stem, classes=CLASSES, mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3])
    metadata |= dict(seed=0, val_fraction=0.2, image_size=side, eval_crop=crop, input_size=size, groups=groups)
    path = folder / f"{case}.safetensors"
    save_checkpoint(model.eval(), path, metadata)
    return path


@pytest.mark.parametrize("case", CASES)
def test_the_export_takes_uint8_pixels_holds_the_classes_and_matches_pytorch(case, tmp_path, capsys):
    path = checkpoint(tmp_path, case)
    out = tmp_path / f"{case}.onnx"
    (tmp_path / f"{case}.onnx.tmp").write_text("mine")  # a user's file with the name a temporary might take
    evaluate.main([str(path), "--export-onnx", str(out)])
    printed = capsys.readouterr().out
    assert (tmp_path / f"{case}.onnx.tmp").read_text() == "mine"
    assert "largest logit difference" in printed and "top-1 classes differ on 0" in printed
    properties = {p.key: p.value for p in onnx.load(out).metadata_props}
    assert json.loads(properties["classes"]) == CLASSES and json.loads(properties["mean"]) == [0.5, 0.4, 0.3]
    assert "uint8" in properties["preprocessing"] and properties["input_size"] == str(CASES[case][1])
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (given,) = session.get_inputs()
    assert given.type == "tensor(uint8)" and given.shape[1:] == [3, CASES[case][1], CASES[case][1]]
    side = CASES[case][1]
    pixels = torch.randint(0, 256, (5, 3, side, side), dtype=torch.uint8)  # another batch size than exported
    logits = session.run(None, {given.name: pixels.numpy()})[0]
    model, metadata = evaluate.load_checkpoint(path)
    expected = evaluate.predict(model, pixels, metadata, None, False, torch.device("cpu")).numpy()
    assert logits.shape == (5, len(CLASSES)) and np.abs(logits - expected).max() < evaluate.ONNX_TOLERANCE


def test_the_check_takes_the_splits_images_with_a_data_dir_else_random_ones(trained_run, image_folder, tmp_path):
    checkpoint = str(trained_run / "best.safetensors")
    model, metadata = evaluate.load_checkpoint(checkpoint)
    args = evaluate.parse_args([checkpoint, "--export-onnx", "m.onnx", "--data-dir", str(image_folder)])
    images, source = evaluate.onnx_check_images(args, metadata)
    assert len(images) == 50 and source == f"{image_folder} test"  # the test split: 5 per class
    shutil.copytree(image_folder / "train", tmp_path / "train")  # no test/: the run's validation split
    args = evaluate.parse_args([checkpoint, "--export-onnx", "m.onnx", "--data-dir", str(tmp_path)])
    images, source = evaluate.onnx_check_images(args, metadata)
    assert len(images) == 40 and source == f"{tmp_path} val"
    shutil.copytree(image_folder / "train", tmp_path / "alone" / "val")  # val/ on its own: all of it
    args = evaluate.parse_args([checkpoint, "--export-onnx", "m.onnx", "--data-dir", str(tmp_path / "alone")])
    images, source = evaluate.onnx_check_images(args, metadata)
    assert len(images) == 200 and source == f"{tmp_path / 'alone'} val"
    for image in sorted((tmp_path / "train").rglob("*.png"))[::2]:  # other data than the run's: fine for the check
        image.unlink()
    args = evaluate.parse_args([checkpoint, "--export-onnx", "m.onnx", "--data-dir", str(tmp_path)])
    assert len(evaluate.onnx_check_images(args, metadata)[0]) == 20
    for folder in sorted((tmp_path / "train").iterdir())[:2]:  # other classes: refused with evaluation advice before
        folder.rename(folder.with_name(f"other-{folder.name}"))
    assert len(evaluate.onnx_check_images(args, metadata)[0]) == 20
    shutil.copytree(image_folder / "train", tmp_path / "copy" / "test")  # the run's training images: no score here
    args = evaluate.parse_args([checkpoint, "--export-onnx", "m.onnx", "--data-dir", str(tmp_path / "copy")])
    assert len(evaluate.onnx_check_images(args, metadata)[0]) == 200
    images, source = evaluate.onnx_check_images(evaluate.parse_args([checkpoint, "--export-onnx", "m.onnx"]), metadata)
    assert images.shape == (evaluate.ONNX_SYNTHETIC, 3, 32, 32) and images.dtype == torch.uint8 and source == "random"


def test_a_graph_that_does_not_match_is_refused_and_not_kept(tmp_path, monkeypatch):
    path = checkpoint(tmp_path, "imagenet-stem")
    real = evaluate.predict
    monkeypatch.setattr(evaluate, "predict", lambda *args: real(*args) + 0.01)  # PyTorch's logits shifted
    with pytest.raises(evaluate.data.UserError, match="does not match PyTorch.*nothing was written"):
        evaluate.export_onnx(evaluate.parse_args([str(path), "--export-onnx", str(tmp_path / "m.onnx")]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imagenet-stem.safetensors"]


def test_export_refusals_are_one_line(tmp_path, monkeypatch, capsys):
    path = checkpoint(tmp_path, "cifar-stem")
    (tmp_path / "taken.onnx").write_text("mine")
    (tmp_path / "folder.onnx").mkdir()
    cases = (
        (["model.pt"], "give a file name ending in .onnx"),
        ([""], "give a file name ending in .onnx"),
        ([".onnx"], "give a file name ending in .onnx"),
        (["taken.onnx"], "exists; pass --overwrite"),
        (["folder.onnx", "--overwrite"], "folder.onnx names a folder; pass a file name"),
    )
    for (target, *flags), words in cases:
        with pytest.raises(SystemExit) as refused:
            evaluate.main([str(path), "--export-onnx", str(tmp_path / target) if target else "", *flags])
        assert words in str(refused.value) and str(refused.value).startswith("error:")
    with pytest.raises(SystemExit, match="fresh.onnx/? names a folder"):  # a slash at the end: not a file's name
        evaluate.main([str(path), "--export-onnx", f"{tmp_path / 'fresh.onnx'}/"])
    assert (tmp_path / "taken.onnx").read_text() == "mine" and (tmp_path / "folder.onnx").is_dir()
    ignored = ["--json", "r.json"], ["--plot-dir", "p"], ["--no-calibration"], ["--split", "val"], ["--cache-dir", "c"]
    for flags in ignored:  # --split and --cache-dir: without --data-dir the check's images are random
        with pytest.raises(SystemExit) as refused:  # argparse's own refusal, code 2
            evaluate.main([str(path), "--export-onnx", str(tmp_path / "new.onnx"), *flags])
        assert refused.value.code == 2
    assert "pass --data-dir too (the run's own folder for --split val), or drop them" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar-stem.safetensors", "folder.onnx", "taken.onnx"]


@pytest.mark.parametrize("package", ["onnxruntime", "onnxscript"])
def test_a_missing_package_is_named_in_one_line(package, tmp_path, monkeypatch):
    path = checkpoint(tmp_path, "cifar-stem")
    real_import = builtins.__import__

    def without_it(name, *args, **kwargs):
        if name == package:
            raise ImportError(name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_it)
    with pytest.raises(SystemExit) as refused:
        evaluate.main([str(path), "--export-onnx", str(tmp_path / "new.onnx")])
    assert f"needs {package}: pip install -r requirements-dev.txt" in str(refused.value)
    assert not (tmp_path / "new.onnx").exists()


def test_a_failed_write_is_one_line_and_keeps_the_old_file(tmp_path, monkeypatch):
    path = checkpoint(tmp_path, "cifar-stem")
    (tmp_path / "m.onnx").write_text("the old export")

    def disk_full(target, write):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(evaluate, "write_atomically", disk_full)
    with pytest.raises(SystemExit, match="^error: could not write .*m.onnx .*No space left on device"):
        evaluate.main([str(path), "--export-onnx", str(tmp_path / "m.onnx"), "--overwrite"])
    assert (tmp_path / "m.onnx").read_text() == "the old export"
