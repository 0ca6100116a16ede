"""--recipe cpu: its settings, the precision it chooses (bf16 where the CPU has bf16 instructions,
float32 where it has not, and whatever the user chose when they chose), and --small-epochs; a resumed
run of any recipe keeps the precision it was launched in."""

import json
import shutil

import pytest
from accelerate.state import AcceleratorState
from conftest import quick_args

import evaluate
import model
import train
from model import save_checkpoint


@pytest.fixture
def a_cpu(monkeypatch, tmp_path):
    """A CPU-only machine with a plain launch: no GPU, no precision chosen, no accelerate config file."""
    monkeypatch.setattr(train.torch.accelerator, "is_available", lambda: False)
    monkeypatch.setattr(train, "LAUNCHER", ([b"accelerate", b"launch", b"train.py"], [b"HOME=/home/you"]))
    monkeypatch.setattr(train, "default_config_file", str(tmp_path / "no-config.yaml"))


def test_the_cpu_recipe_takes_bf16_only_where_the_cpu_has_its_instructions(a_cpu, monkeypatch):
    args = train.parse_args(["--recipe", "cpu"])
    monkeypatch.setattr(train, "cpu_flags", lambda: {"sse4_2", "avx2", "avx512f"})  # a CPU made to lack them
    precision, why = train.chosen_precision(args)
    assert precision == "no" and "neither AVX512-BF16 nor AMX" in why
    monkeypatch.setattr(train, "cpu_flags", lambda: {"avx2", "avx512f", "amx_bf16", "amx_tile"})
    precision, why = train.chosen_precision(args)
    assert precision == train.LARGE_EPOCHS_BF16 and "amx_bf16" in why and "float32 in any --small-epochs" in why
    assert train.chosen_precision(train.parse_args([])) == (None, None)  # the other recipes: as launched
    assert train.chosen_precision(train.parse_args(["--recipe", "seed"])) == (None, None)


@pytest.mark.parametrize(
    "launcher, config",
    [
        (([b"accelerate", b"launch", b"--mixed_precision", b"no", b"train.py"], []), False),
        (([b"accelerate", b"launch", b"--mixed_precision=bf16", b"train.py"], []), False),
        (([b"accelerate", b"launch", b"train.py"], [b"ACCELERATE_MIXED_PRECISION=no"]), False),  # exported
        (([b"accelerate", b"launch", b"train.py"], []), True),  # `accelerate config` answered
    ],
)
def test_a_precision_the_user_chose_wins(a_cpu, monkeypatch, tmp_path, launcher, config):
    monkeypatch.setattr(train, "cpu_flags", lambda: {"avx512_bf16"})
    monkeypatch.setattr(train, "LAUNCHER", launcher)
    if config:
        (tmp_path / "no-config.yaml").write_text("mixed_precision: 'no'\n")
    assert train.chosen_precision(train.parse_args(["--recipe", "cpu"])) == (None, None)


def test_python_train_py_with_the_variable_set_by_hand_is_a_choice(a_cpu, monkeypatch):
    monkeypatch.setattr(train, "LAUNCHER", None)
    monkeypatch.setattr(train, "cpu_flags", lambda: {"avx512_bf16"})
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert train.chosen_precision(train.parse_args(["--recipe", "cpu"]))[0] == train.LARGE_EPOCHS_BF16
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    assert train.chosen_precision(train.parse_args(["--recipe", "cpu"])) == (None, None)


@pytest.mark.parametrize(
    "flags, side, settings",
    [
        ([], 32, (16, 48, 9)),  # 9 of the 16 epochs at 32x32, the rest at 48x48
        (["--epochs", "8"], 32, (8, 48, 4)),
        (["--epochs", "1"], 32, (1, 48, 0)),
        (["--small-epochs", "3"], 32, (16, 48, 3)),
        (["--input-size", "32"], 32, (16, 32, 0)),  # nothing to grow to: no small epochs, and no refusal
        (["--stem", "cifar"], 32, (16, 32, 0)),
        ([], 300, (16, 224, 0)),  # photos
    ],
)
def test_the_cpu_recipe_grows_its_inputs_where_it_can(flags, side, settings):
    args = train.parse_args(["--recipe", "cpu", "--weights", "none", *flags])
    train.data_settings(args, side)
    assert (args.epochs, args.input_size, args.small_epochs) == settings
    assert args.lr == train.SCRATCH_LR * (1 if side == 32 else train.PHOTO_BATCH_SIZE / 128)


def test_a_resumed_cpu_run_keeps_the_precision_it_ran_in(a_cpu, monkeypatch, tmp_path):
    monkeypatch.setattr(train, "cpu_flags", lambda: {"amx_bf16"})
    state = tmp_path / "run" / "state"
    state.mkdir(parents=True)
    config = {"recipe": "cpu", "mixed_precision": "no"}  # launched with --mixed_precision no
    (state / "progress.json").write_text(train.json.dumps({"config": config, "history": []}))
    args = train.parse_args(["--output-dir", str(tmp_path / "run"), "--resume"])  # the printed resume command
    precision, why = train.chosen_precision(args)
    assert precision == "no" and "the run's own" in why


@pytest.fixture
def fresh_precision():
    """accelerate fixes the precision once a process: let this test choose another, then the next test."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_a_resumed_run_keeps_the_precision_it_was_launched_in(
    a_cpu, fresh_precision, image_folder, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "run"
    with monkeypatch.context() as launch:  # accelerate launch --mixed_precision bf16 train.py ...
        launch.setattr(train, "LAUNCHER", ([b"accelerate", b"launch", b"--mixed_precision", b"bf16", b"train.py"], []))
        launch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
        train.main(quick_args(image_folder, out, "--epochs", "1", "--schedule", "constant"))
    AcceleratorState._reset_state(reset_partial_state=True)  # a new process, launched without the flag
    capsys.readouterr()
    train.main(["--output-dir", str(out), "--resume", "--epochs", "2"])
    assert [r["precision"] for r in json.loads((out / "history.json").read_text())] == ["bf16", "bf16"]
    said = capsys.readouterr().out
    assert "precision: bf16 autocast, the run's own (accelerate launch --mixed_precision to change it)" in said


def test_bf16_chosen_by_the_rule_leaves_the_small_epochs_in_float32(a_cpu, image_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train, "cpu_flags", lambda: {"amx_bf16"})
    autocast = []  # each forward pass, training and validation: whether bf16 autocast was on

    def build_model(*args, **kwargs):
        network = model.build_model(*args, **kwargs)
        network.register_forward_pre_hook(lambda *_: autocast.append(train.torch.is_autocast_enabled("cpu")))
        return network

    monkeypatch.setattr(train, "build_model", build_model)
    out = tmp_path / "run"
    train.main(quick_args(image_folder, out, "--recipe", "cpu", "--input-size", 48, "--small-epochs", 1))
    history = json.loads((out / "history.json").read_text())
    assert [(r["input_size"], r["precision"]) for r in history] == [(32, "no"), (48, "bf16")]
    first = autocast.index(True)
    assert 0 < first and not any(autocast[:first]) and all(autocast[first:])  # epoch 1 float32, epoch 2 bf16
    config = json.loads((out / "state" / "progress.json").read_text())["config"]
    assert config["mixed_precision"] == train.LARGE_EPOCHS_BF16
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:  # a refused resume: its one error line, no precision line before it
        train.main(["--output-dir", str(out), "--resume", "--epochs", "1"])
    assert "already trained 2 epochs" in str(refused.value.code) and capsys.readouterr().out == ""
    args = train.parse_args(["--output-dir", str(out), "--resume"])
    assert train.chosen_precision(args) == (
        train.LARGE_EPOCHS_BF16,
        "bf16 autocast after any --small-epochs, the run's own (accelerate launch --mixed_precision to change it)",
    )


def test_small_epochs_train_and_validate_at_the_stored_size_first(image_folder, tmp_path, monkeypatch, capsys):
    def keep_each_epoch(network, path, metadata):  # last.safetensors of every epoch, kept
        save_checkpoint(network, path, metadata)
        if path.name == "last.safetensors":
            shutil.copy(path, tmp_path / f"epoch{metadata['epoch']}.safetensors")

    monkeypatch.setattr(train, "save_checkpoint", keep_each_epoch)
    out = tmp_path / "run"
    train.main(quick_args(image_folder, out, "--input-size", 48, "--small-epochs", 1))
    history = json.loads((out / "history.json").read_text())
    assert [record["input_size"] for record in history] == [32, 48]
    assert "the first 1 epoch(s) at 32x32" in capsys.readouterr().out
    assert model.load_checkpoint(out / "best.safetensors")[1]["input_size"] == 48  # epoch 2, whatever its loss
    # each checkpoint records its epoch's size, so evaluate.py repeats that epoch's validation
    for record in history:
        checkpoint = tmp_path / f"epoch{record['epoch']}.safetensors"
        assert model.load_checkpoint(checkpoint)[1]["input_size"] == record["input_size"]
        evaluate.main([str(checkpoint), "--split", "val", "--no-plots", "--json", str(tmp_path / "r.json")])
        assert json.loads((tmp_path / "r.json").read_text())["accuracy"] == pytest.approx(record["val_acc"])
    capsys.readouterr()
    evaluate.main([str(out / "best.safetensors"), "--split", "val", "--no-plots"])
    assert "history: best epoch 2 (the lowest validation loss at 48x48);" in capsys.readouterr().out
    (out / "history.json").write_text(json.dumps(history[:1]))  # as if stopped in epoch 2: epoch 1's files
    shutil.copy(tmp_path / "epoch1.safetensors", out / "best.safetensors")
    evaluate.main([str(out / "best.safetensors"), "--split", "val", "--no-plots"])
    assert "best epoch 1 (the lowest validation loss at 32x32, before any epoch at --input-size 48)" in (
        capsys.readouterr().out
    )


@pytest.mark.parametrize(
    "flags, says",
    [
        (["--input-size", 48, "--small-epochs", 2], "--small-epochs 2 leaves none of the 2 epochs at --input-size"),
        (["--small-epochs", 1], "and --input-size is 32; drop --small-epochs, or pass a larger --input-size"),
    ],
)
def test_small_epochs_that_would_do_nothing_are_refused(image_folder, tmp_path, flags, says, capsys):
    with pytest.raises(SystemExit) as stopped:
        train.main([str(arg) for arg in quick_args(image_folder, tmp_path / "run", *flags)])
    # argparse prints the first refusal and exits 2; the second is main()'s one line
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line] or [stopped.value.code]
    assert stopped.value.code and len(errors) == 1 and says in errors[0], errors
    assert not (tmp_path / "run").exists()
