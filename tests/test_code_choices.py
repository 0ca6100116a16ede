"""Choices made by editing the code, not by flags: the network (model.ARCH) and the optimizer's class
(build_training). A run records both; evaluate.py rebuilds a checkpoint from its own record, and
--resume refuses a run of other code in one line."""

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import quick_args
from safetensors import safe_open

import evaluate
import model
import train
from model import decode_metadata


def metadata_of(path):
    with safe_open(path, framework="pt") as file:
        return decode_metadata(file.metadata())


def test_another_resnet_trains_evaluates_and_exports_and_older_checkpoints_still_evaluate(
    image_folder, trained_run, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(model, "ARCH", "resnet34")
    train.main(quick_args(image_folder, tmp_path / "run", "--epochs", "1"))
    checkpoint = tmp_path / "run" / "best.safetensors"
    recorded = metadata_of(checkpoint)
    assert recorded["arch"] == recorded["config"]["arch"] == "resnet34"
    assert recorded["config"]["optimizer"] == "SGD"
    rebuilt, _ = model.load_checkpoint(checkpoint)
    assert len(rebuilt.layer3) == 6  # ResNet34's third stage; ResNet18 has 2 blocks there
    capsys.readouterr()
    evaluate.main([str(checkpoint), "--no-plots"])
    assert "accuracy" in capsys.readouterr().out
    evaluate.main([str(trained_run / "best.safetensors"), "--no-plots"])  # a ResNet18's, under ResNet34 code
    assert "accuracy" in capsys.readouterr().out
    if importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("onnxscript"):
        evaluate.main([str(checkpoint), "--export-onnx", str(tmp_path / "m.onnx")])
        assert "exported in" in capsys.readouterr().out and (tmp_path / "m.onnx").is_file()  # and checked


def refused_resume(out, capsys):
    with pytest.raises(SystemExit) as stopped:
        train.main(["--output-dir", str(out), "--resume", "--epochs", "3"])
    message = str(stopped.value.code)
    assert message.startswith("error: ") and "\n" not in message
    return message


def test_resuming_under_another_network_or_optimizer_is_one_line(
    image_folder, trained_run, tmp_path, monkeypatch, capsys
):
    with monkeypatch.context() as patched:  # refused before anything of the run is touched
        patched.setattr(model, "ARCH", "resnet34")
        message = refused_resume(trained_run, capsys)
    assert "is a resnet18 run, and model.ARCH is now resnet34" in message

    def adamw(groups, lr, momentum, nesterov):  # SGD swapped for AdamW, as a user would in build_training
        return torch.optim.AdamW(groups, lr=lr)

    out = tmp_path / "run"  # a run more epochs would train: trained_run's cosine lr is 0, refused first
    train.main(quick_args(image_folder, out, "--epochs", "1", "--schedule", "constant"))
    monkeypatch.setattr(torch.optim, "SGD", adamw)
    message = refused_resume(out, capsys)
    assert "was trained with SGD, and build_training now makes AdamW" in message


def test_the_commented_step_schedule_decays_in_steps_and_an_extended_run_never_jumps_back_up(monkeypatch):
    """The README's step-decay edit: uncomment the `step` line of SCHEDULES."""
    source = Path(train.__file__).read_text()
    (line,) = [line for line in source.splitlines() if line.strip().startswith('# "step": lambda')]
    schedules = eval("{" + line.strip().removeprefix("# ") + "}", vars(train))  # the line, uncommented
    monkeypatch.setitem(train.SCHEDULES, "step", schedules["step"])
    planned = [train.lr_factor(step, 100, 0, "step") for step in range(100)]
    assert sorted(set(planned), reverse=True) == pytest.approx([1.0, 0.1, 0.01]) and planned[49] == 1.0
    args = SimpleNamespace(schedule="step", decay_start=None, lr=0.1, epochs=20)  # 10 epochs of 10 steps, resumed
    line = train.extend_schedule(args, 10, 6, 10, 0)  # after epoch 6 of 10, at 0.1 of the peak; now 20 epochs
    assert "goes on from 0.01 and follows the step schedule to 0.0001 at its new end, epoch 20" in line  # not 0
    extended = [train.lr_factor(step, 200, 0, "step", args.decay_start) for step in range(60, 200)]
    assert extended[0] == pytest.approx(0.1) and all(a >= b for a, b in zip(extended, extended[1:]))
