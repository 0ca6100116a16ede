"""The training controls: accumulation, clipping, mixup/CutMix, the augmentation policies,
freeze-then-unfreeze with a lower backbone lr, and the lr range test."""

import json
import math
import signal

import pytest
import torch
import torch.nn.functional as F
from conftest import quick_args
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_pre_hook

import data
import train
from model import build_model, is_head


@pytest.fixture
def optimizer_steps(monkeypatch):
    """Every optimizer step of the runs in the test: each group's lr and the gradient's total norm."""
    steps = []

    def record(optimizer, args, kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()
        steps.append(dict(lrs=[group["lr"] for group in optimizer.param_groups], norm=norm))

    handle = register_optimizer_step_pre_hook(record)
    yield steps
    handle.remove()


def test_accumulation_makes_the_optimizer_steps_and_lrs_of_the_larger_batch(image_folder, tmp_path, optimizer_steps):
    train.main(quick_args(image_folder, tmp_path / "large", "--batch-size", "16"))
    large = list(optimizer_steps)
    optimizer_steps.clear()
    train.main(quick_args(image_folder, tmp_path / "accumulated", "--batch-size", "8", "--grad-accum-steps", "2"))
    assert len(large) == 6  # 48 images, batches of 16, 2 epochs
    assert [s["lrs"] for s in optimizer_steps] == [s["lrs"] for s in large]
    for run in ("large", "accumulated"):
        with safe_open(tmp_path / run / "last.safetensors", "pt") as file:
            assert json.loads(file.metadata()["effective_batch_size"]) == 16


def test_clipping_bounds_the_gradient_norm(image_folder, tmp_path, optimizer_steps):
    flags = ["--lr", "0.5", "--epochs", "1"]
    train.main(quick_args(image_folder, tmp_path / "free", *flags))
    assert max(s["norm"] for s in optimizer_steps) > 0.05  # the bound below is below the norms met
    optimizer_steps.clear()
    train.main(quick_args(image_folder, tmp_path / "clipped", *flags, "--clip-grad-norm", "0.05"))
    assert optimizer_steps and all(s["norm"] <= 0.05 * (1 + 1e-4) for s in optimizer_steps)


def test_mixup_is_the_weighted_mix_of_each_image_and_the_one_before_it():
    generator = torch.Generator().manual_seed(0)
    images, labels = torch.rand(6, 3, 8, 8), torch.arange(6)
    mixed, partner, share = data.mix(images, labels, generator, mixup_alpha=0.4)
    assert 0 <= share <= 1 and share.ndim == 0
    assert torch.equal(partner, labels.roll(1))
    assert torch.allclose(mixed, share * images + (1 - share) * images.roll(1, 0))


def test_cutmix_pastes_a_box_and_its_share_is_the_area_left():
    generator = torch.Generator().manual_seed(3)
    for _ in range(10):
        images = torch.arange(4.0)[:, None, None, None].expand(4, 3, 16, 16)  # image i is all i
        mixed, partner, share = data.mix(images, torch.arange(4), generator, cutmix_alpha=1.0)
        own = (mixed == images).all(1).float().mean((1, 2))  # the share of each image's own pixels
        assert torch.allclose(own, share.expand(4))
        assert torch.isin(mixed, images.roll(1, 0)[:, :1]).logical_or(mixed == images).all()


def test_mixed_targets_sum_to_one_and_the_loss_is_their_cross_entropy():
    """The two-label loss train.py uses equals cross-entropy with the soft target share x own + (1 - share)
    x partner, whose rows sum to 1, with label smoothing too."""
    generator = torch.Generator().manual_seed(1)
    images, labels = torch.rand(8, 3, 8, 8), torch.randint(10, (8,), generator=generator)
    for alphas in ((0.2, 0.0), (0.0, 1.0), (0.2, 1.0)):
        _, partner, share = data.mix(images, labels, generator, *alphas)
        target = share * F.one_hot(labels, 10) + (1 - share) * F.one_hot(partner, 10)
        assert torch.allclose(target.sum(1), torch.ones(8))
        logits = torch.randn(8, 10, generator=generator)
        criterion = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
        two_labels = share * criterion(logits, labels) + (1 - share) * criterion(logits, partner)
        assert torch.allclose(two_labels, criterion(logits, target))


@pytest.mark.parametrize("side", [32, 96])
@pytest.mark.parametrize("policy", ["ta_wide", "ra"])
def test_every_auto_augment_operation_keeps_shape_and_range(policy, side):
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(8, 3, side, side, generator=generator)
    ranges = data.AUTO_AUGMENT_RANGES[policy]
    for index, name in enumerate(data.AUTO_AUGMENT_OPS):
        op = torch.full((8,), index)
        strength, sign = torch.rand(8, generator=generator), torch.where(torch.rand(8) < 0.5, -1.0, 1.0)
        coloured = data.colour_operations(images, op, strength, sign, ranges)
        theta = data.affine_matrix(op, strength * sign, ranges, side)
        grid = F.affine_grid(theta[:, :2], list(images.shape), align_corners=False)
        result = F.grid_sample(coloured, grid, align_corners=False)
        assert result.shape == images.shape and result.dtype == images.dtype, name
        assert 0 <= result.min() and result.max() <= 1, name
        changed = not torch.allclose(result, images, atol=1e-5)
        assert changed == (name != "identity"), name
    batch = data.auto_augment(images, policy, generator)
    assert batch.shape == images.shape and 0 <= batch.min() and batch.max() <= 1


def test_images_of_one_batch_draw_different_operations():
    one = torch.rand(1, 3, 32, 32).expand(64, 3, 32, 32)
    for policy in ("ta_wide", "ra"):
        out = data.auto_augment(one, policy, torch.Generator().manual_seed(0))
        different = {tuple(image.flatten()[:50].tolist()) for image in out}
        assert len(different) > 10, policy  # 64 images, 14 operations, strengths and signs
        again = data.auto_augment(one, policy, torch.Generator().manual_seed(0))
        assert torch.equal(out, again)  # the generator's draws, nothing else


def test_freezing_keeps_the_backbone_and_its_batchnorm_statistics_then_trains_them(
    image_folder, tmp_path, weights_file, monkeypatch, optimizer_steps
):
    states = []
    end_epoch = train.end_epoch

    def saved(run, *args):
        states.append({key: value.clone() for key, value in run.evaluated.state_dict().items()})
        return end_epoch(run, *args)

    monkeypatch.setattr(train, "end_epoch", saved)
    flags = ["--weights", weights_file, "--freeze-epochs", "1", "--backbone-lr-mult", "0.1"]
    train.main(quick_args(image_folder, tmp_path / "run", *flags))
    start = build_model(10, "imagenet", str(weights_file)).state_dict()
    backbone = [key for key in start if not is_head(key)]
    assert any("running_mean" in key for key in backbone)
    assert all(torch.equal(states[0][key], start[key]) for key in backbone)  # epoch 1: the head alone
    assert not torch.equal(states[0]["fc.weight"], states[1]["fc.weight"])
    moved = [key for key in backbone if not torch.equal(states[1][key], start[key])]
    assert "layer1.0.conv1.weight" in moved and "bn1.running_mean" in moved  # epoch 2: all of it
    # backbone groups first, then the head's: at 0 while frozen (3 steps), then at a tenth of the head's lr
    # after a warmup of their own (--warmup-epochs 1: 3 steps)
    ramp = [0, 0, 0, 1 / 3, 2 / 3, 1]
    assert [s["lrs"][0] for s in optimizer_steps] == pytest.approx(
        [0.1 * r * s["lrs"][-1] for r, s in zip(ramp, optimizer_steps)]
    )


def stop_after(epochs, monkeypatch):
    """Stop the next run as Ctrl-C would, at the first step after `epochs` epochs."""
    train_epoch = train.train_epoch

    def stopping(epoch, run, accelerator, args, stop):
        if epoch > epochs:
            stop(signal.SIGINT, None)
        return train_epoch(epoch, run, accelerator, args, stop)

    monkeypatch.setattr(train, "train_epoch", stopping)


@pytest.mark.parametrize(
    "flags",
    [
        ["--batch-size", "8", "--grad-accum-steps", "2", "--clip-grad-norm", "1", "--mixup", "0.2", "--cutmix", "1",
         "--auto-augment", "ta_wide"],
        ["--freeze-epochs", "1", "--backbone-lr-mult", "0.1", "--auto-augment", "ra"],
    ],
    ids=["accumulate-clip-mix-ta_wide", "freeze-backbone_lr-ra"],
)  # fmt: skip
def test_a_resumed_run_with_the_controls_equals_an_uninterrupted_one(image_folder, tmp_path, weights_file, flags):
    flags = [*flags, "--weights", weights_file, "--epochs", "3"]
    train.main(quick_args(image_folder, tmp_path / "whole", *flags))
    with pytest.MonkeyPatch.context() as monkeypatch:
        stop_after(1, monkeypatch)
        with pytest.raises(SystemExit) as stopped:
            train.main(quick_args(image_folder, tmp_path / "part", *flags))
    assert stopped.value.code == 130
    # the command train.py prints, which names none of the flags: accelerate's accumulation and data parallel
    # settings were built from the defaults, and an accumulating run ended at lr 0 in its first resumed epoch
    train.main(["--output-dir", str(tmp_path / "part"), "--resume"])
    accelerator = train.make_accelerator(train.parse_args(["--output-dir", str(tmp_path / "part"), "--resume"]))[0]
    assert accelerator.gradient_accumulation_steps == (2 if "--grad-accum-steps" in flags else 1)
    assert accelerator.ddp_handler.find_unused_parameters == ("--freeze-epochs" in flags)
    whole, part = (json.loads((tmp_path / run / "history.json").read_text()) for run in ("whole", "part"))
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in whole] == [
        {k: v for k, v in r.items() if k != "seconds"} for r in part
    ]
    whole, part = load_file(tmp_path / "whole" / "last.safetensors"), load_file(tmp_path / "part" / "last.safetensors")
    assert all(torch.equal(whole[key], part[key]) for key in whole)


def find_lr_args(data_dir, out):
    """A quick run's flags with --find-lr, less its --epochs (refused: the range test has its own schedule)."""
    flags = quick_args(data_dir, out, "--find-lr")
    del flags[flags.index("--epochs") : flags.index("--epochs") + 2]
    return flags


def test_find_lr_writes_its_plot_and_nothing_else(image_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(train, "FIND_LR_STEPS", 20)  # a test's 20 steps: what is written is the same
    existing = tmp_path / "a-run"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    flags = [f for f in find_lr_args(image_folder, existing) if f != "--output-dir" and f != str(existing)]
    train.main([*flags, "--output-dir", str(existing)])
    out = capsys.readouterr().out
    assert sorted(p.name for p in existing.iterdir()) == ["lr_find.png", "notes.txt"]
    assert (existing / "notes.txt").read_text() == "mine"
    assert (existing / "lr_find.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    suggested = float(out.split("suggested peak lr: ")[1].split()[0])
    assert 1e-8 < suggested < 10 and "rule: a tenth of the lr at the lowest smoothed loss" in out
    train.main([*flags, "--find-lr"])  # no --output-dir: the current folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-run", "lr_find.png"]


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--mixup", "-0.2"], "--mixup: must be a number at least 0"),
        (["--cutmix", "-1"], "--cutmix: must be a number at least 0"),
        (["--grad-accum-steps", "0"], "--grad-accum-steps: must be an integer at least 1"),
        (["--freeze-epochs", "2", "--epochs", "2", "--weights", "w.pth"], "--freeze-epochs 2 leaves none of the 2"),
        (["--freeze-epochs", "1", "--weights", "none"], "--weights none has none; drop --freeze-epochs"),
        (["--backbone-lr-mult", "0.1", "--weights", "none"], "drop --backbone-lr-mult"),
        (["--find-lr", "--resume", "--output-dir", "x"], "--find-lr saves no run"),
        (["--find-lr", "--patience", "2", "--ema", "0.9"], "trains no run, so --patience and --ema would do nothing"),
        # its own lr schedule: before, these were taken and unused (--warmup-epochs 9 refused as never peaking)
        (["--find-lr", "--schedule", "linear", "--warmup-epochs", "0"], "so --schedule and --warmup-epochs would do"),
        (["--find-lr", "--epochs", "5", "--warmup-epochs", "9"], "so --warmup-epochs and --epochs would do nothing"),
        (["--momentum", "0"], "Nesterov momentum needs a --momentum above 0; pass one, or --no-nesterov"),
        (["--zero-init-residual"], "--weights imagenet loads every weight over it; drop it, or pass --weights none"),
        (["--no-zero-init-residual", "--weights", "w.pth"], "--no-zero-init-residual sets how a network starts"),
        (["--auto-augment", "autoaugment"], "invalid choice"),
    ],
)
def test_bad_control_flags_get_one_error_line(flags, words, capsys):
    with pytest.raises(SystemExit) as refused:
        train.parse_args(flags)
    assert refused.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and words in errors[0], errors


def test_find_lr_takes_epochs_where_they_set_the_size_it_trains_at():
    assert train.parse_args(["--find-lr", "--recipe", "cpu", "--epochs", "1"]).epochs == 1  # no --small-epochs


def test_evaluate_says_when_the_training_figures_come_from_mixed_batches():
    import evaluate

    history = [dict(epoch=1, train_loss=1.0, train_acc=0.5, val_loss=1.1, val_acc=0.6)]
    assert evaluate.overfitting(history, {"mixup": 0.2, "cutmix": 0.0})["mixed_training_batches"]
    assert evaluate.overfitting(history, {"cutmix": 1.0})["mixed_training_batches"]
    assert not evaluate.overfitting(history, {"mixup": 0.0, "cutmix": 0.0})["mixed_training_batches"]
    assert not evaluate.overfitting(history)["mixed_training_batches"]  # a checkpoint from before the flags


def test_find_lr_refuses_a_folder_in_the_plots_place_and_says_when_the_loss_is_never_finite(
    image_folder, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(train, "FIND_LR_STEPS", 5)
    (tmp_path / "lr_find.png").mkdir()
    with pytest.raises(train.UserError, match="is not a plot of train.py --find-lr, and the plot would replace it"):
        train.train(train.parse_args(find_lr_args(image_folder, tmp_path)))
    (tmp_path / "lr_find.png").rmdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "lr_find.png")  # a picture of yours, by chance of that name
    with pytest.raises(train.UserError, match="is not a plot of train.py --find-lr"):
        train.train(train.parse_args(find_lr_args(image_folder, tmp_path)))
    monkeypatch.setattr(train.data, "normalizer", lambda *args, **kwargs: lambda images: images.float() * math.inf)
    with pytest.raises(train.UserError, match="finite from the start"):
        train.train(train.parse_args(find_lr_args(image_folder, tmp_path / "other")))
    assert not (tmp_path / "other").exists()


def test_a_resumed_run_must_keep_epochs_to_train_after_the_freeze(image_folder, tmp_path, weights_file, monkeypatch):
    flags = ["--weights", weights_file, "--epochs", "3", "--freeze-epochs", "2"]
    stop_after(1, monkeypatch)
    with pytest.raises(SystemExit):
        train.main(quick_args(image_folder, tmp_path / "run", *flags))
    with pytest.raises(train.UserError, match="--freeze-epochs 2, and --epochs 2 would end it before"):
        train.train(train.parse_args(["--output-dir", str(tmp_path / "run"), "--resume", "--epochs", "2"]))
