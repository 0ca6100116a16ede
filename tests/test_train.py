import json
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
import torchvision
from conftest import CLASSES, ROOT, both_ranks, launch, quick_args, run_script
from safetensors import safe_open
from safetensors.torch import load_file
from torch._dynamo.testing import CompileCounterWithBackend

import evaluate
import train

HISTORY_KEYS = {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "precision", "seconds"}


def test_run_writes_checkpoints_and_history(trained_run):
    history = json.loads((trained_run / "history.json").read_text())
    assert [r["epoch"] for r in history] == [1, 2]
    assert all(HISTORY_KEYS <= r.keys() for r in history)
    assert all(r["val_samples"] == 40 and r["precision"] == "no" for r in history)  # 20% of 200 images, each once
    with safe_open(trained_run / "last.safetensors", "pt") as f:
        meta = f.metadata()
    for key in (
        "arch",
        "stem",
        "classes",
        "mean",
        "std",
        "image_size",
        "input_size",
        "seed",
        "val_fraction",
        "epoch",
        "val_loss",
        "val_acc",
        "num_processes",
    ):
        assert key in meta, key
    assert json.loads(meta["epoch"]) == 2 and json.loads(meta["num_processes"]) == 1
    assert json.loads(meta["input_size"]) == train.IMAGENET_STEM_INPUT_SIZE  # quick_args use --stem imagenet
    assert (trained_run / "best.safetensors").is_file()


def test_seed_recipe_takes_the_write_up_settings_and_explicit_flags_win():
    args = settings(["--recipe", "seed", "--epochs", "2"])
    assert (args.lr, args.momentum, args.batch_size, args.weight_decay) == (1e-3, 0.9, 128, 0.0)
    assert (args.schedule, args.stem, args.mean, args.epochs) == ("constant", "imagenet", (0.5, 0.5, 0.5), 2)
    assert not args.zero_init_residual and train.parse_args([]).zero_init_residual
    assert settings([]).lr == train.RECIPE_VALUES["default"]["lr"]
    assert settings(["--weights", "none"]).lr == train.SCRATCH_LR


def settings(argv, photos=False):
    args = train.parse_args(argv)
    train.data_settings(args, 375 if photos else 32)
    return args


def test_input_size_follows_the_stem_unless_given():
    assert settings([]).input_size == 32
    assert settings(["--stem", "imagenet"]).input_size == train.IMAGENET_STEM_INPUT_SIZE
    assert settings(["--recipe", "seed"]).input_size == 32  # the write-up trained at 32x32
    assert settings(["--stem", "imagenet", "--input-size", "40"]).input_size == 40


# The last step's factor: cosine is all but zero; linear is one step above it, 1 - 89/90.
@pytest.mark.parametrize("schedule, last", [("cosine", 0.001), ("linear", 1 / 90 + 1e-9)])
def test_lr_schedule_warms_up_then_decays_to_zero(schedule, last):
    factors = [train.lr_factor(step, 100, 10, schedule) for step in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0) and factors[-1] < last
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))


def test_linear_schedule_is_a_straight_line_and_constant_stays_put():
    assert train.lr_factor(55, 100, 10, "linear") == pytest.approx(0.5)
    assert train.lr_factor(55, 100, 10, "cosine") == pytest.approx(0.5)
    assert train.lr_factor(32, 100, 10, "linear") < train.lr_factor(32, 100, 10, "cosine")
    assert train.lr_factor(50, 100, 0, "constant") == 1.0


def test_an_existing_run_is_not_overwritten_by_accident(trained_run):
    before = (trained_run / "best.safetensors").read_bytes()
    with pytest.raises(SystemExit, match="already holds a run"):
        train.main(quick_args(trained_run.parent.parent, trained_run))
    assert (trained_run / "best.safetensors").read_bytes() == before


def test_resume_extends_a_run_and_keeps_finished_epochs(image_folder, tmp_path):
    out = tmp_path / "run"
    train.main(quick_args(image_folder, out, "--schedule", "constant"))  # a cosine run ends at lr 0: see test_faults
    first = json.loads((out / "history.json").read_text())
    train.main(["--output-dir", str(out), "--resume", "--epochs", "3"])
    history = json.loads((out / "history.json").read_text())
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert history[:2] == first


def test_overwrite_replaces_the_run(image_folder, tmp_path):
    out = tmp_path / "run"
    train.main(quick_args(image_folder, out, "--epochs", "1"))
    train.main(quick_args(image_folder, out, "--epochs", "1", "--overwrite"))
    assert len(json.loads((out / "history.json").read_text())) == 1


def test_sigterm_then_resume_matches_an_uninterrupted_run(image_folder, tmp_path):
    """A 3-epoch run stopped by SIGTERM after epoch 1 and resumed equals the uninterrupted run."""
    flags = ["--batch-size", "4", "--epochs", "3", "--max-train-samples", "40"]
    whole = tmp_path / "whole"
    train.main(quick_args(image_folder, whole, *flags))

    stopped = tmp_path / "stopped"
    command = [sys.executable, "train.py", *quick_args(image_folder, stopped, *flags)]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    history = stopped / "history.json"
    while process.poll() is None and not history.exists():
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 130, output
    assert "--resume" in output
    assert len(json.loads(history.read_text())) < 3

    train.main(["--output-dir", str(stopped), "--resume"])
    expected = json.loads((whole / "history.json").read_text())
    resumed = json.loads(history.read_text())
    for a, b in zip(expected, resumed, strict=True):
        assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}
    weights_whole, weights_resumed = load_file(whole / "last.safetensors"), load_file(stopped / "last.safetensors")
    assert all(torch.equal(weights_whole[k], weights_resumed[k]) for k in weights_whole)


def test_kill_9_leaves_loadable_files_and_a_resumable_run(image_folder, tmp_path):
    from model import load_checkpoint

    out = tmp_path / "run"
    command = [sys.executable, "train.py", *quick_args(image_folder, out, "--epochs", "3", "--batch-size", "4")]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while process.poll() is None and not (out / "history.json").exists():
        time.sleep(0.02)
    time.sleep(0.5)  # somewhere in the next epoch, perhaps mid-write
    process.kill()
    process.wait()
    for name in ("best.safetensors", "last.safetensors"):
        load_checkpoint(out / name)  # whole, or the previous version: never half-written
    json.loads((out / "history.json").read_text())
    train.main(["--output-dir", str(out), "--resume"])
    assert len(json.loads((out / "history.json").read_text())) == 3


def test_two_cpu_processes_train_data_parallel(two_process_run, image_folder, tmp_path):
    """accelerate launch --multi_gpu on a CPU-only machine: one run of 2 processes, not 2 runs."""
    shared, result = two_process_run
    out = shutil.copytree(shared, tmp_path / "ddp")  # resumed below: the shared run stays as it was
    assert result.returncode == 0, both_ranks(result)
    assert "2 process(es) (MULTI_CPU)" in result.stdout
    assert result.stdout.count("best: epoch") == 1  # only the main process reports and writes
    history = json.loads((out / "history.json").read_text())
    assert history[0]["val_samples"] == 40  # every validation image exactly once across processes
    with safe_open(out / "best.safetensors", "pt") as f:
        assert json.loads(f.metadata()["num_processes"]) == 2
    # what training measured is what evaluate.py measures on the saved checkpoint
    evaluate.main([str(out / "best.safetensors"), "--data-dir", str(image_folder), "--split", "val", "--no-plots",
                   "--json", str(tmp_path / "r.json")])  # fmt: skip
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["accuracy"] == pytest.approx(history[0]["val_acc"], abs=1e-9)
    assert results["loss"] == pytest.approx(history[0]["val_loss"], rel=1e-4)
    # a checkpoint written by 2 processes resumes in 1, and says what that changes
    train.main(["--output-dir", str(out), "--resume", "--epochs", "2"])
    assert [r["epoch"] for r in json.loads((out / "history.json").read_text())] == [1, 2]


def test_two_processes_follow_the_schedule_to_its_end(image_folder, tmp_path):
    """The 3 batches of an epoch are 1 a process on 2 processes: the schedule counts the steps they take,
    and the lr ends at 0 as 1 process's does (it ended at 0.05 of 0.2 when counted in 3 a process)."""
    out = tmp_path / "run"
    result = run_script(*launch(2), "train.py", *quick_args(image_folder, out, "--warmup-epochs", "0"))
    assert result.returncode == 0, both_ranks(result)
    peak = json.loads((out / "state" / "progress.json").read_text())["config"]["lr"]
    assert [r["lr"] for r in json.loads((out / "history.json").read_text())] == pytest.approx([peak / 2, 0])


def test_a_non_finite_loss_stops_the_run_with_a_message(image_folder, tmp_path, monkeypatch):
    out = tmp_path / "run"
    args = train.parse_args(quick_args(image_folder, out, "--lr", "1", "--label-smoothing", "0"))
    args.lr = 1e30  # past the flag's bound: the training loss itself is nan
    monkeypatch.setattr(train, "parse_args", lambda argv: args)
    with pytest.raises(SystemExit, match="the loss is nan at epoch 1, step 3; no checkpoint was written. Lower"):
        train.main([])
    assert not (out / "best.safetensors").exists() and not (out / "history.json").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--weights", "missing.pth"], "not found"),
        (["--data-dir", "empty"], "cat holds no images"),
        (["--output-dir", "run", "--resume"], "nothing to resume"),
    ],
)
def test_bad_training_input_is_one_line_and_writes_nothing(tmp_path, image_folder, flags, message):
    (tmp_path / "empty" / "train" / "cat").mkdir(parents=True)
    args = flags if "--resume" in flags else [*quick_args(image_folder, tmp_path / "out"), *flags]
    args = [str(tmp_path / a) if a in ("missing.pth", "empty", "run") else a for a in args]
    with pytest.raises(SystemExit) as stopped:  # in-process: the same main() a command runs, without its imports
        train.main(args)
    error = str(stopped.value.code)
    assert error.startswith("error: ") and "\n" not in error and message in error, error
    assert not (tmp_path / "out").exists() and not (tmp_path / "run").exists()


def test_recommendation_flags_train_and_evaluate(image_folder, tmp_path, capsys):
    import evaluate

    out = tmp_path / "run"
    train.main(
        quick_args(
            image_folder,
            out,
            "--epochs",
            "1",
            "--two-stage",
            "--targeted-augment",
            "animals",
            "--class-weights",
            "auto",
        )
    )
    history = out / "history.json"
    assert len(json.loads(history.read_text())[0]["val_per_class"]) == 10
    evaluate.main([str(out / "best.safetensors"), "--data-dir", str(image_folder), "--no-plots"])
    assert "stage 1 (vehicles or animals) accuracy" in capsys.readouterr().out
    # weights that follow a previous run's per-class validation error
    weights = train.class_weights(str(history), torch.zeros(1, dtype=torch.long), CLASSES)
    per_class = torch.tensor(json.loads(history.read_text())[0]["val_per_class"])
    assert weights.mean().item() == pytest.approx(1.0)
    assert weights.argmax() == per_class.argmin()


def test_class_weights_from_a_list_and_from_frequencies():
    labels = torch.tensor([0, 0, 0, 1])
    assert train.class_weights("auto", labels, ["a", "b"]).tolist() == pytest.approx([0.5, 1.5])
    assert train.class_weights("1,3", labels, ["a", "b"]).tolist() == pytest.approx([0.5, 1.5])
    assert train.class_weights("none", labels, ["a", "b"]) is None
    with pytest.raises(train.UserError, match="needs 2 finite, non-negative weights"):
        train.class_weights("1,2,3", labels, ["a", "b"])


def test_ema_follows_the_weights_with_a_short_warmup():
    model, ema = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.fill_(1.0), ema.weight.fill_(0.0)
    train.update_ema(ema, model, step=0, decay=0.99)  # decay min(0.99, 1/10): mostly the model
    assert torch.allclose(ema.weight, torch.full((2, 2), 0.9))
    train.update_ema(ema, model, step=10_000, decay=0.99)
    assert torch.allclose(ema.weight, torch.full((2, 2), 0.9 + 0.1 * 0.01))


def test_ema_run_saves_the_average_and_resumes_exactly(image_folder, tmp_path):
    flags = ["--epochs", "2", "--ema", "0.9"]
    train.main(quick_args(image_folder, tmp_path / "whole", *flags))
    train.main(quick_args(image_folder, tmp_path / "part", "--epochs", "1", "--ema", "0.9"))
    train.main(["--output-dir", str(tmp_path / "part"), "--resume", "--epochs", "2"])
    whole, part = load_file(tmp_path / "whole" / "last.safetensors"), load_file(tmp_path / "part" / "last.safetensors")
    assert all(torch.equal(whole[k], part[k]) for k in whole)
    plain = train.parse_args(quick_args(image_folder, tmp_path / "plain", "--epochs", "2"))
    assert plain.ema == 0.0


def test_bf16_mixed_precision_trains_and_saves_float32(image_folder, tmp_path, monkeypatch):
    """The GPU path's autocast, exercised on CPU: accelerate reads the launcher's setting from the environment."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    out = tmp_path / "bf16"
    train.main(quick_args(image_folder, out, "--epochs", "1", "--max-train-samples", "64"))
    history = json.loads((out / "history.json").read_text())
    assert history[0]["val_samples"] == 40 and 0 <= history[0]["val_acc"] <= 1
    assert {t.dtype for t in load_file(out / "best.safetensors").values()} <= {torch.float32, torch.int64}


def test_resume_of_a_run_saved_before_newer_settings_existed(image_folder, tmp_path):
    """A state written by an older train.py lacks later settings: they take their defaults."""
    out = tmp_path / "run"
    train.main(quick_args(image_folder, out, "--epochs", "1"))
    progress_file = out / "state" / "progress.json"
    progress = json.loads(progress_file.read_text())
    for key in ("ema", "zero_init_residual", "input_size"):
        del progress["config"][key]
    progress_file.write_text(json.dumps(progress))
    train.main(["--output-dir", str(out), "--resume", "--epochs", "2"])
    assert [r["epoch"] for r in json.loads((out / "history.json").read_text())] == [1, 2]


def test_compile_trains_resumes_either_way_and_saves_plain_torchvision_weights(image_folder, tmp_path, monkeypatch):
    """--compile on tiny runs, with and without the EMA. The test compiles with AOTAutograd but not
    inductor's code generation, which takes a minute or more on 2 cores before the first step
    (bench/throughput.py times the real thing); the wrapper, its names, the EMA and the state are the same."""
    counter = CompileCounterWithBackend("aot_eager")
    modes, torch_compile = [], torch.compile

    def compile_quickly(model, mode):
        modes.append(mode)
        return torch_compile(model, backend=counter)

    monkeypatch.setattr(torch, "compile", compile_quickly)
    plain, averaged = tmp_path / "plain", tmp_path / "averaged"
    train.main(quick_args(image_folder, plain, "--epochs", "1", "--compile"))
    for name in ("best", "last"):  # no _orig_mod. prefix: plain torchvision loads them
        torchvision.models.resnet18(num_classes=10).load_state_dict(load_file(plain / f"{name}.safetensors"))
    train.main(["--output-dir", str(plain), "--resume", "--epochs", "2"])  # eager now: the state is the same
    train.main(quick_args(image_folder, averaged, "--epochs", "1", "--compile", "--ema", "0.9"))
    train.main(["--output-dir", str(averaged), "--resume", "--epochs", "2", "--compile"])
    assert modes == [train.COMPILE_MODE] * 3 and counter.frame_count > 0
    for run in (plain, averaged):
        assert [r["epoch"] for r in json.loads((run / "history.json").read_text())] == [1, 2]
    # The EMA followed the compiled model: it copies the BatchNorm batch counter at each of the 2 x 3 steps.
    assert load_file(averaged / "last.safetensors")["bn1.num_batches_tracked"].item() == 6


def test_tensorboard_holds_the_history_per_epoch_and_the_loss_every_log_every_steps(
    image_folder, tmp_path, monkeypatch
):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    monkeypatch.setattr(train, "LOG_EVERY", 4)
    out = tmp_path / "run"
    flags = ("--log-with", "tensorboard", "--schedule", "constant")  # constant: the run can be extended
    train.main(quick_args(image_folder, out, *flags, "--max-train-samples", "160"))  # 2 x 10 steps
    history = json.loads((out / "history.json").read_text())
    events = event_accumulator.EventAccumulator(str(out / train.TRACKER_PROJECT)).Reload()
    for key in ("train_loss", "val_loss", "val_acc", "lr"):
        logged = [(event.step, event.value) for event in events.Scalars(key)]
        assert logged == [(10, pytest.approx(history[0][key])), (20, pytest.approx(history[1][key]))], key
    assert [event.step for event in events.Scalars("step/loss")] == [4, 8, 10, 14, 18, 20]
    assert events.Scalars("val_acc/cat")[-1].value == pytest.approx(history[1]["val_per_class"][3])
    # accelerate's hparams.yml beside the events was taken for a file not of the run: both were refused
    assert list(out.glob(f"{train.TRACKER_PROJECT}/**/hparams.yml"))
    train.main(["--output-dir", str(out), "--resume", "--epochs", "3"])
    assert len(json.loads((out / "history.json").read_text())) == 3
    train.main(quick_args(image_folder, out, *flags, "--epochs", "1", "--overwrite"))
    assert len(json.loads((out / "history.json").read_text())) == 1


@pytest.mark.parametrize(
    "tracker, advice",
    [
        ("wandb", "needs the wandb package; pip install wandb"),
        ("all", "found no tracker installed; pip install tensorboard"),
    ],
)
def test_a_tracker_not_installed_is_one_error_line_naming_the_package(
    image_folder, tmp_path, monkeypatch, tracker, advice
):
    monkeypatch.setattr(train, "get_available_trackers", lambda: [])
    with pytest.raises(SystemExit, match=f"^error: --log-with {tracker} {advice}"):
        train.main(quick_args(image_folder, tmp_path / "run", "--log-with", tracker))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("asked", [[b"--num_processes", b"2"], [b"--num_processes=2"]])
def test_a_launch_that_started_fewer_processes_than_asked_says_so(asked, monkeypatch, capsys):
    # accelerate launch --num_processes 2 --cpu, without --multi_gpu, starts one process and says nothing
    monkeypatch.setattr(train, "LAUNCHER", ([b"accelerate", b"launch", *asked, b"--cpu", b"train.py"], []))
    train.check_process_count(SimpleNamespace(num_processes=1, print=print))
    assert "warning: accelerate launch --num_processes 2 started 1; add --multi_gpu" in capsys.readouterr().out
    train.check_process_count(SimpleNamespace(num_processes=2, print=print))
    assert capsys.readouterr().out == ""
