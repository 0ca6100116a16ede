import json
import sys

import pytest
import torch
from conftest import CLASSES, run_script
from PIL import Image

import evaluate


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
    results = json.loads(out.read_text())
    assert results["split"] == "val" and results["num_samples"] == 40
    assert set(results["per_class"]) == set(CLASSES)
    history = json.loads((trained_run / "history.json").read_text())
    best = min(history, key=lambda r: r["val_loss"])
    assert results["accuracy"] == pytest.approx(best["val_acc"])  # the run's own validation split
    assert results["loss"] == pytest.approx(best["val_loss"], rel=1e-4)  # at the run's input size
    assert results["overfitting"]["best_epoch"] == best["epoch"]
    for name in ("curves.png", "confusion.png", "per_class.png"):
        with Image.open(tmp_path / name) as image:
            assert image.format == "PNG" and image.width > 400


def test_test_split_and_tta(trained_run, image_folder, tmp_path):
    out = tmp_path / "results.json"
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
        metadata={"arch": "resnet18", "stem": "cifar", "classes": json.dumps(CLASSES)},
    )
    return [
        (tmp_path / "missing.safetensors", "not found"),
        (text, "not a readable safetensors"),
        (truncated, "not a readable safetensors"),
        (other, "missing key 'conv1.weight'"),
    ]


def test_bad_checkpoints_get_one_line_errors_without_traceback(trained_run, image_folder, tmp_path):
    for path, message in bad_checkpoints(trained_run, tmp_path):
        result = run_script(sys.executable, "evaluate.py", str(path), "--data-dir", str(image_folder), "--no-plots")
        assert result.returncode != 0
        assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_classes_that_do_not_match_the_data_are_an_error(trained_run, tmp_path):
    (tmp_path / "train" / "apple").mkdir(parents=True)
    (tmp_path / "train" / "pear").mkdir(parents=True)
    for name in ("apple", "pear"):
        Image.new("RGB", (32, 32)).save(tmp_path / "train" / name / "0.png")
    with pytest.raises(SystemExit, match="classes"):
        evaluate.main([str(trained_run / "best.safetensors"), "--data-dir", str(tmp_path), "--split", "val"])
