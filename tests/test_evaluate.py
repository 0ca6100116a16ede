import errno
import json
import shutil

import numpy as np
import pytest
import torch
from conftest import CLASSES, class_images
from PIL import Image, PngImagePlugin

import evaluate
from model import build_model, save_checkpoint


def small_run(root, classes, per_class=4):
    """A freshly initialised checkpoint for these classes, alone in ROOT/run/, and an image folder
    ROOT/data/{train,test}/<class>/*.png: any number of classes, in a second."""
    torch.manual_seed(0)
    metadata = dict(
        arch="resnet18",
        stem="imagenet",
        classes=classes,
        mean=[0.5] * 3,
        std=[0.5] * 3,
        input_size=32,
        seed=0,
        val_fraction=0.2,
    )
    (root / "run").mkdir(parents=True)
    checkpoint = root / "run" / "best.safetensors"
    save_checkpoint(build_model(len(classes), "imagenet", "none"), checkpoint, metadata)
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for label, name in enumerate(classes):
            folder = root / "data" / split / name
            folder.mkdir(parents=True)
            for i, pixels in enumerate(class_images(label, per_class, rng)):
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return checkpoint, root / "data"


def files_under(folder):
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


def test_evaluate_prints_every_class_and_writes_json_and_plots(trained_run, image_folder, tmp_path, capsys):
    out = tmp_path / "results.json"
    evaluate.main(
        [
            str(trained_run / "best.safetensors"),
            "--data-dir",
            str(image_folder),
            "--split",
            "val",
            "--json",
            str(out),
            "--plot-dir",
            str(tmp_path),
        ]
    )
    printed = capsys.readouterr().out
    assert all(name in printed for name in CLASSES)
    report = [line for line in printed.splitlines() if not line.startswith("data: ")]  # where the images came from
    assert f"{trained_run / 'best.safetensors'}, val split, TTA off: 40 images" in report[0]
    header = next(line for line in printed.splitlines() if line.startswith("class"))
    assert header.split("(")[0].split() == ["class", "accuracy", "precision", "F1"]  # accuracy = recall: once
    assert "accuracy = recall" in header
    results = json.loads(out.read_text())
    assert results["split"] == "val" and results["num_samples"] == 40
    assert set(results["per_class"]) == set(CLASSES)
    history = json.loads((trained_run / "history.json").read_text())
    best = min(history, key=lambda r: r["val_loss"])
    assert results["accuracy"] == pytest.approx(best["val_acc"])  # the run's own validation split
    assert results["loss"] == pytest.approx(best["val_loss"], rel=1e-4)  # at the run's input size
    assert results["overfitting"]["best_epoch"] == best["epoch"]
    assert results["checkpoint"] == str(trained_run / "best.safetensors") and results["tta"] is False
    assert results["per_class_recall"] == results["per_class"]  # both keys kept for older readers
    plots = [
        "curves.png",
        "best_val_calibration.png",
        "best_val_confusion.png",
        "best_val_per_class.png",
        "best_val_mistakes.png",
    ]
    for name in plots:
        assert str(tmp_path / name) in printed
        with Image.open(tmp_path / name) as image:
            assert image.format == "PNG" and image.width > 400
    assert files_under(tmp_path) == sorted(["results.json", *plots])


def test_test_split_and_tta(trained_run, image_folder, tmp_path, capsys):
    out = tmp_path / "results.json"
    run_files = files_under(trained_run)
    evaluate.main(
        [
            str(trained_run / "best.safetensors"),
            "--data-dir",
            str(image_folder),
            "--tta",
            "--json",
            str(out),
            "--no-plots",
        ]
    )
    results = json.loads(out.read_text())
    assert results["split"] == "test" and results["num_samples"] == 50 and results["tta"]
    report = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("data: ")]
    assert report[0].startswith(f"{trained_run / 'best.safetensors'}, test split, TTA on: 50 images")
    assert files_under(tmp_path) == ["results.json"] and files_under(trained_run) == run_files  # --no-plots


def test_precision_recall_from_a_known_confusion_matrix():
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    predictions = torch.tensor([0, 0, 0, 1, 1, 0, 2, 2])
    confusion = evaluate.confusion_matrix(labels, predictions, 3)
    assert confusion.tolist() == [[3, 1, 0], [1, 1, 0], [0, 0, 2]]
    precision, recall, f1 = evaluate.precision_recall_f1(confusion)
    assert precision.tolist() == pytest.approx([0.75, 0.5, 1.0])
    assert recall.tolist() == pytest.approx([0.75, 0.5, 1.0])
    assert f1.tolist() == pytest.approx([0.75, 0.5, 1.0])
    top = evaluate.top_confusions(confusion, ["a", "b", "c"], k=5)
    assert top == [{"true": "a", "pred": "b", "count": 1}, {"true": "b", "pred": "a", "count": 1}]


def test_group_gap_matches_the_seed_write_up_arithmetic():
    recall = torch.zeros(10, dtype=torch.float64)
    recall[[0, 1, 8, 9]] = 0.9
    recall[[2, 3, 4, 5, 6, 7]] = 0.7
    groups = evaluate.group_accuracies(recall, CLASSES)
    assert groups["vehicles"] == pytest.approx(0.9) and groups["gap"] == pytest.approx(0.2)


def test_overfitting_figures_from_a_hand_made_history():
    history = [
        {"epoch": 1, "train_loss": 1.0, "train_acc": 0.60, "val_loss": 1.2, "val_acc": 0.55},
        {"epoch": 2, "train_loss": 0.5, "train_acc": 0.80, "val_loss": 0.8, "val_acc": 0.70},
        {"epoch": 3, "train_loss": 0.2, "train_acc": 0.95, "val_loss": 1.0, "val_acc": 0.72},
    ]
    o = evaluate.overfitting(history)
    assert o["best_epoch"] == 2
    assert o["val_loss_increase_pct"] == pytest.approx(25.0)
    assert o["train_val_acc_gap_best"] == pytest.approx(10.0)
    assert o["train_val_acc_gap_last"] == pytest.approx(23.0)
    assert o["loss_ratio_best"] == pytest.approx(1.6) and o["loss_ratio_last"] == pytest.approx(5.0)
    assert evaluate.overfitting([]) is None


def bad_checkpoints(trained_run, tmp_path):
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes((trained_run / "best.safetensors").read_bytes()[:100_000])
    text = tmp_path / "notes.safetensors"
    text.write_text("hello")
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file(
        {"weight": torch.zeros(2)},
        other,
        metadata={"arch": "resnet18", "stem": "cifar", "classes": json.dumps(CLASSES)}
        | {key: "0" for key in ("mean", "std", "seed", "val_fraction")},
    )
    return [
        (tmp_path / "missing.safetensors", "not found"),
        (text, "not a readable safetensors"),
        (truncated, "not a readable safetensors"),
        (other, "missing key 'conv1.weight'"),
    ]


def test_bad_checkpoints_get_one_line_errors_without_traceback(trained_run, image_folder, tmp_path):
    for path, message in bad_checkpoints(trained_run, tmp_path):  # in-process: the same main(), without the imports
        with pytest.raises(SystemExit) as stopped:
            evaluate.main([str(path), "--data-dir", str(image_folder), "--no-plots"])
        assert str(stopped.value.code).startswith("error: ") and message in str(stopped.value.code)
        assert len(str(stopped.value.code).splitlines()) == 1


def test_classes_that_do_not_match_the_data_are_an_error(trained_run, tmp_path):
    (tmp_path / "train" / "apple").mkdir(parents=True)
    (tmp_path / "train" / "pear").mkdir(parents=True)
    for name in ("apple", "pear"):
        Image.new("RGB", (32, 32)).save(tmp_path / "train" / name / "0.png")
    with pytest.raises(SystemExit, match="classes"):
        evaluate.main([str(trained_run / "best.safetensors"), "--data-dir", str(tmp_path), "--split", "val"])


def test_plots_of_each_checkpoint_split_and_tta_have_their_own_names(trained_run, image_folder, tmp_path, capsys):
    plots = tmp_path / "plots"
    for checkpoint, *flags in (("best", "--split", "val"), ("last", "--split", "val"), ("best", "--tta")):
        evaluate.main(
            [str(trained_run / f"{checkpoint}.safetensors"), "--data-dir", str(image_folder), "--plot-dir", str(plots)]
            + flags
        )
    names = [
        f"{run}_{kind}.png"
        for run in ("best_val", "last_val", "best_test_tta")
        for kind in ("calibration", "confusion", "per_class", "mistakes")
    ]
    assert files_under(plots) == sorted(["curves.png", *names])
    printed = capsys.readouterr().out
    assert all(str(plots / name) in printed for name in names)


def test_plot_titles_say_what_was_evaluated_and_curves_show_whole_epochs():
    title = "runs/a/best.safetensors, val split, TTA on"
    confusion = torch.tensor([[3, 1], [0, 4]])
    figure = evaluate.plot_confusion(confusion, ["cat", "dog"], title)
    assert title in figure.axes[0].get_title()
    figure = evaluate.plot_per_class({"cat": 0.75, "dog": 1.0}, ["cat", "dog"], title)
    assert title in figure.axes[0].get_title() and figure.axes[0].get_legend() is None  # no groups
    history = [
        {
            "epoch": epoch,
            "train_loss": 1 / epoch,
            "train_acc": 0.2 * epoch,
            "val_loss": 1.1 / epoch,
            "val_acc": 0.1 * epoch,
        }
        for epoch in (1, 2, 3)
    ]
    figure = evaluate.plot_curves(history, "training curves: runs/a/history.json")
    figure.canvas.draw()
    assert figure.get_suptitle() == "training curves: runs/a/history.json"
    for axis in figure.axes:
        low, high = axis.get_xlim()
        ticks = [tick for tick in axis.get_xticks() if low <= tick <= high]
        assert ticks and all(tick == round(tick) for tick in ticks), ticks


@pytest.mark.parametrize("n, best, worst", [(1, 0, 0), (2, 1, 1), (3, 1, 1), (5, 2, 2), (10, 3, 2)])
def test_best_and_worst_marks_never_overlap(n, best, worst):
    marks = evaluate.best_and_worst([1 - i / n for i in range(n)])  # class 0 best, n - 1 worst
    assert [i for i, mark in marks.items() if mark == "best"] == list(range(best))
    assert [i for i, mark in marks.items() if mark == "worst"] == list(range(n - worst, n))


@pytest.mark.parametrize(
    "accuracies, best, worst",
    [
        ([0.0] * 10, [], []),  # all tied at 0.00%: none is best
        ([0.9, 0.5, 0.5, 0.5, 0.0], [0], [4]),  # the tied middle is neither
        ([1.0, 1.0, 1.0, 1.0, 0.2, 0.1], [], [4, 5]),  # four tied at the top for three places
    ],
)
def test_tied_classes_are_not_marked_best_or_worst_by_chance(accuracies, best, worst):
    marks = evaluate.best_and_worst(accuracies)
    assert [i for i, mark in marks.items() if mark == "best"] == best
    assert [i for i, mark in marks.items() if mark == "worst"] == worst


@pytest.mark.parametrize(
    "classes, grouped",
    [(["cat", "dog"], False), (["airplane", "cat", "dog"], True), (["apple", "cat", "truck"], False)],
)
def test_models_with_few_classes_evaluate(classes, grouped, tmp_path, capsys):
    checkpoint, data_dir = small_run(tmp_path, classes)
    out = tmp_path / "results.json"
    evaluate.main([str(checkpoint), "--data-dir", str(data_dir), "--json", str(out)])
    printed = capsys.readouterr().out
    results = json.loads(out.read_text())
    assert results["num_samples"] == 4 * len(classes) and set(results["per_class"]) == set(classes)
    assert "nan" not in printed.lower() and "history" not in printed  # no history.json: silent
    assert ("vehicles" in printed) == grouped and (results["groups"] is not None) == grouped
    assert (results["stage1_accuracy"] is not None) == grouped
    plots = [
        "best_test_calibration.png",
        "best_test_confusion.png",
        "best_test_mistakes.png",
        "best_test_per_class.png",
    ]
    assert files_under(checkpoint.parent) == ["best.safetensors", *plots]


@pytest.mark.parametrize(
    "text, reason",
    [
        ('[{"epoch": 1, "train_loss": 2.1, "train_acc"', "Expecting"),  # truncated mid-write
        ('[{"epoch": 1, "train_loss": 2.1, "val_loss": 2.2, "val_acc": 0.3}]', "record 1 has no number for train_acc"),
        ('[{"epoch": 1, "train_loss": 2.1, "train_acc": null, "val_loss": 2.2, "val_acc": 0.3}]', "for train_acc"),
        ('{"epoch": 1}', "expected a non-empty list"),
        ("[]", "expected a non-empty list"),
    ],
)
def test_an_unusable_history_is_reported_and_the_evaluation_still_runs(text, reason, tmp_path, capsys):
    checkpoint, data_dir = small_run(tmp_path, ["cat", "dog"])
    history = checkpoint.with_name("history.json")
    history.write_text(text)
    out = tmp_path / "results.json"
    evaluate.main([str(checkpoint), "--data-dir", str(data_dir), "--json", str(out)])  # no SystemExit: exit 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("history:")]
    assert len(lines) == 1 and f"{history} is unreadable" in lines[0] and reason in lines[0], lines
    assert json.loads(out.read_text())["overfitting"] is None
    expected = [
        "best.safetensors",
        "best_test_calibration.png",
        "best_test_confusion.png",
        "best_test_mistakes.png",
        "best_test_per_class.png",
    ]
    expected.append("history.json")
    assert files_under(checkpoint.parent) == expected  # no curves.png


def test_an_earlier_curves_png_kept_for_want_of_a_history_is_said(tmp_path, capsys):
    checkpoint, data_dir = small_run(tmp_path, ["cat", "dog"])
    checkpoint.with_name("history.json").write_text("[]")  # unreadable now: no curves to draw
    curves, drawn = checkpoint.with_name("curves.png"), PngImagePlugin.PngInfo()
    drawn.add_text("Source", f"evaluate.py curves of {checkpoint.with_name('history.json')}")
    Image.new("RGB", (8, 8)).save(curves, pnginfo=drawn)
    evaluate.main([str(checkpoint), "--data-dir", str(data_dir)])
    assert f"{curves} is an earlier evaluation's: this one had no history to draw" in capsys.readouterr().out
    assert curves.is_file()  # the only picture of a history that may be gone


def test_another_runs_history_beside_a_checkpoint_is_not_reported_as_its_own(trained_run, tmp_path, capsys):
    shutil.copy(trained_run / "best.safetensors", tmp_path / "copied.safetensors")
    history = json.loads((trained_run / "history.json").read_text())
    for record in history:
        record["val_loss"] += 1  # another run's epochs
    (tmp_path / "history.json").write_text(json.dumps(history))
    evaluate.main([str(tmp_path / "copied.safetensors"), "--split", "val", "--plot-dir", str(tmp_path / "plots")])
    out = capsys.readouterr().out
    assert "has no record of this checkpoint's epoch" in out and "another run's, or older" in out
    assert "best epoch" not in out and not (tmp_path / "plots" / "curves.png").exists()


def test_a_test_folder_holding_training_images_is_refused(tmp_path):
    checkpoint, data_dir = small_run(tmp_path, ["cat", "dog"])
    shutil.copy(data_dir / "train" / "dog" / "2.png", data_dir / "test" / "dog" / "copied.png")
    (data_dir / "test" / "cat" / "linked.png").symlink_to(data_dir / "train" / "cat" / "0.png")
    with pytest.raises(SystemExit) as stopped:
        evaluate.main([str(checkpoint), "--data-dir", str(data_dir), "--no-plots"])
    assert "2 image(s) of" in str(stopped.value.code) and "the test would measure images the network trained on" in str(
        stopped.value.code
    )


def test_plots_and_results_inside_a_split_folder_are_refused_before_any_work(tmp_path):
    checkpoint, data_dir = small_run(tmp_path, ["cat", "dog"])
    for flag, path in (("--plot-dir", data_dir / "test" / "cat"), ("--json", data_dir / "train" / "new" / "r.json")):
        with pytest.raises(SystemExit) as stopped:
            evaluate.main([str(checkpoint), "--data-dir", str(data_dir), flag, str(path)])
        message = str(stopped.value.code)
        assert message.startswith(f"error: {flag} {path} is inside {data_dir / path.relative_to(data_dir).parts[0]}")
    assert files_under(data_dir / "test" / "cat") == [f"{i}.png" for i in range(4)]
    assert not (data_dir / "train" / "new").exists()


def test_batch_size_below_one_is_refused_at_parse_time(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:  # in-process: the same main() a command runs
        evaluate.main([str(tmp_path / "best.safetensors"), "--batch-size", "0"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 2 and len(lines) == 1 and "error: argument --batch-size: " in lines[0]
    assert "at least 1" in lines[0] and not (tmp_path / "best.safetensors").exists()


@pytest.mark.parametrize(
    "value, words",
    [("-3", "must be an integer at least 1"), ("1.5", "is not an integer"), ("many", "is not an integer"),
     ("", "is not an integer"), ("9" * 5000, "at most 9007199254740992")],
)  # fmt: skip
def test_batch_size_must_be_a_positive_integer(value, words, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.parse_args(["best.safetensors", "--batch-size", value])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "argument --batch-size: " in error and words in error
    assert evaluate.parse_args(["best.safetensors", "--batch-size", "7"]).batch_size == 7


def unwritable_outputs(tmp_path):
    """(flags, words the error names) for output paths that cannot be written."""
    (tmp_path / "plots.png").write_bytes(b"not a folder")
    (tmp_path / "notes.txt").write_text("not a folder")
    (tmp_path / "results").mkdir()
    return {
        "plot dir is a file": (["--plot-dir", tmp_path / "plots.png"], ["--plot-dir", "is a file"]),
        "plot dir under a file": (
            ["--plot-dir", tmp_path / "notes.txt" / "plots"],
            ["--plot-dir", "notes.txt is a file"],
        ),
        "json is a folder": (["--json", tmp_path / "results"], ["--json", "names a folder"]),
        "json ends in a slash": (["--json", f"{tmp_path / 'new.json'}/"], ["--json", "new.json/ names a folder"]),
        "json under a file": (
            ["--json", tmp_path / "notes.txt" / "r.json", "--no-plots"],
            ["--json", "notes.txt is a file"],
        ),
    }


@pytest.mark.parametrize(
    "case", ["plot dir is a file", "plot dir under a file", "json is a folder", "json under a file"]
)
def test_unwritable_outputs_are_refused_before_any_work(case, tmp_path, capsys):
    checkpoint, data_dir = small_run(tmp_path / "input", ["cat", "dog"])
    flags, words = unwritable_outputs(tmp_path)[case]
    before = files_under(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main([str(checkpoint), "--data-dir", str(data_dir), *map(str, flags)])
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and "\n" not in message and all(word in message for word in words), message
    assert capsys.readouterr().out == "" and files_under(tmp_path) == before


def test_the_script_refuses_an_unwritable_output_in_one_line(tmp_path, capsys):
    checkpoint, data_dir = small_run(tmp_path / "input", ["cat", "dog"])
    flags, words = unwritable_outputs(tmp_path)["plot dir is a file"]
    before = files_under(tmp_path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:  # in-process: the same main() a command runs
        evaluate.main([str(checkpoint), "--data-dir", str(data_dir), *map(str, flags)])
    error = str(stopped.value.code)
    assert error.startswith("error: ") and "\n" not in error and all(word in error for word in words), error
    assert capsys.readouterr().out == "" and files_under(tmp_path) == before


def test_missing_output_folders_are_created(tmp_path, capsys):
    checkpoint, data_dir = small_run(tmp_path, ["cat", "dog"])
    out, plots = tmp_path / "new" / "a" / "results.json", tmp_path / "new" / "b" / "plots"
    evaluate.main([str(checkpoint), "--data-dir", str(data_dir), "--json", str(out), "--plot-dir", str(plots)])
    assert json.loads(out.read_text())["num_samples"] == 8
    assert files_under(plots) == [
        "best_test_calibration.png",
        "best_test_confusion.png",
        "best_test_mistakes.png",
        "best_test_per_class.png",
    ]


@pytest.mark.parametrize("name", ["best.safetensors", "history.json", "notes.txt"])
def test_json_and_csv_never_replace_a_file_of_another_kind(name, tmp_path):
    checkpoint, data_dir = small_run(tmp_path, ["cat", "dog"])
    target = checkpoint.with_name(name)
    if not target.exists():
        target.write_text("[]")
    before = target.read_bytes()
    with pytest.raises(SystemExit, match=r"^error: --json .*pass a new \.json file name"):
        evaluate.main([str(checkpoint), "--data-dir", str(data_dir), "--json", str(target), "--no-plots"])
    with pytest.raises(SystemExit, match=r"^error: --csv .*pass a new \.csv file name"):
        evaluate.main([str(checkpoint), "--predict", str(data_dir), "--csv", str(target), "--no-plots"])
    assert target.read_bytes() == before


def test_bad_input_leaves_no_output_folders(tmp_path):
    checkpoint, data_dir = small_run(tmp_path / "input", ["cat", "dog"])
    shutil.rmtree(data_dir / "test")
    out, plots = tmp_path / "out" / "results.json", tmp_path / "out" / "plots"
    with pytest.raises(SystemExit, match="^error: .*has no test/ folder; pass --split val"):
        evaluate.main([str(checkpoint), "--data-dir", str(data_dir), "--json", str(out), "--plot-dir", str(plots)])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("target", ["json", "plots"])
def test_a_failed_write_at_the_end_is_one_error_line(target, tmp_path, monkeypatch, capsys):
    checkpoint, data_dir = small_run(tmp_path, ["cat", "dog"])
    out = tmp_path / "results.json"

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    if target == "json":
        monkeypatch.setattr(evaluate.Path, "write_text", disk_full)
    else:
        monkeypatch.setattr(evaluate.plt.Figure, "savefig", disk_full)
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main([str(checkpoint), "--data-dir", str(data_dir), "--json", str(out)])
    path = out if target == "json" else checkpoint.with_name("best_test_confusion.png")
    message = str(exit_info.value.code)
    assert message.startswith(f"error: could not write {path} (") and "No space left" in message, message
    assert "\n" not in message and "accuracy" in capsys.readouterr().out  # after the work, one line
