"""Calibration: the temperature train.py fits and saves, and evaluate.py's ECE, NLL and Brier."""

import json

import matplotlib.pyplot as plt
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import evaluate
import train


def test_the_temperature_fit_lowers_the_nll_of_over_confident_logits():
    torch.manual_seed(0)
    honest = torch.randn(4000, 10) * 2
    labels = torch.distributions.Categorical(logits=honest).sample()  # the labels these logits predict
    over_confident = honest * 3
    temperature = evaluate.fit_temperature(over_confident, labels)
    assert temperature == pytest.approx(3, rel=0.1)
    before, after = (evaluate.calibration(over_confident, labels, t) for t in (1.0, temperature))
    assert after["nll"] < before["nll"] - 0.5 and after["ece"] < before["ece"]
    assert after["brier"] < before["brier"]


def test_the_fit_stays_in_its_range_on_a_split_it_gets_all_right():
    """There the NLL falls towards 0 as T does: the search stops inside its range, sharper than T = 1."""
    logits = torch.eye(4).repeat(10, 1) * 5
    temperature = evaluate.fit_temperature(logits, torch.arange(4).repeat(10))
    assert evaluate.TEMPERATURE_RANGE[0] <= temperature < 1


def test_ece_nll_and_brier_against_a_hand_worked_example():
    # four images, two classes: confidences 0.85, 0.85 (one right) and 0.55, 0.55 (both right)
    p = torch.tensor([[0.85, 0.15], [0.85, 0.15], [0.55, 0.45], [0.45, 0.55]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 1])
    scores = evaluate.calibration(p.log(), labels)
    # bin 12, (12/15, 13/15]: accuracy 0.5, confidence 0.85; bin 8, (8/15, 9/15]: accuracy 1, confidence 0.55
    assert scores["bins"]["count"][12] == 2 and scores["bins"]["count"][8] == 2 and sum(scores["bins"]["count"]) == 4
    assert scores["ece"] == pytest.approx(2 / 4 * 0.35 + 2 / 4 * 0.45)
    assert scores["nll"] == pytest.approx(-torch.tensor([0.85, 0.15, 0.55, 0.55]).log().mean().item())
    assert scores["brier"] == pytest.approx((2 * 0.15**2 + 2 * 0.85**2 + 2 * 0.45**2 + 2 * 0.45**2) / 4)


def test_the_reliability_diagram_marks_the_confidence_of_filled_bins_only():
    p = torch.tensor([[0.85, 0.15], [0.85, 0.15], [0.55, 0.45], [0.45, 0.55]], dtype=torch.float64)
    raw = evaluate.calibration(p.log(), torch.tensor([0, 1, 0, 1]))
    figure = evaluate.plot_calibration(dict(raw=raw, calibrated=None), "four images")
    (dots,) = [line for line in figure.axes[0].lines if line.get_label() == "mean confidence"]
    assert list(dots.get_ydata()) == pytest.approx([0.55, 0.85])  # bins 8 and 12; no dots at 0 for the empty ones
    plt.close(figure)


def test_a_run_saves_its_temperature_and_evaluate_reports_and_draws_both(trained_run, image_folder, tmp_path, capsys):
    for name in ("best.safetensors", "last.safetensors"):
        with safe_open(trained_run / name, "pt") as file:
            metadata = file.metadata()
        temperature, fitted = json.loads(metadata["temperature"]), json.loads(metadata["calibration"])
        assert evaluate.TEMPERATURE_RANGE[0] <= temperature <= evaluate.TEMPERATURE_RANGE[1]
        assert fitted["val_nll"][1] <= fitted["val_nll"][0] and "validation split, 40 images" in fitted["fitted_on"]
        assert fitted["images"] == 40
    evaluate.main([str(trained_run / "best.safetensors"), "--data-dir", str(image_folder), "--plot-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert f"at the checkpoint's T = {temperature:.3f}" in out or "checkpoint's T =" in out
    assert "ECE" in out and "Brier" in out and "fitted on the run's validation split" in out
    assert "T was fitted on only 40 validation images, too few to trust" in out
    assert (tmp_path / "best_test_calibration.png").is_file()
    said = train.calibration_summary(trained_run / "best.safetensors")  # train.py's last lines
    assert said[0].startswith("calibration: T = ") and "fitted on the run's validation split, 40 images" in said[0]
    assert "too few to trust" in said[1]
    with pytest.raises(SystemExit) as refused:  # an evaluation reports both T = 1 and T: nothing to switch off
        evaluate.parse_args([str(trained_run / "best.safetensors"), "--no-calibration"])
    assert refused.value.code == 2


def test_calibrated_and_raw_predictions_have_the_same_argmax(trained_run, image_folder, tmp_path, capsys):
    checkpoint = str(trained_run / "best.safetensors")
    files = [str(p) for p in sorted((image_folder / "test").rglob("*.jpg"))[:20]]
    tables = {}
    for flags in ((), ("--no-calibration",)):
        csv_file = tmp_path / f"p{len(flags)}.csv"
        evaluate.main([checkpoint, "--predict", *files, "--csv", str(csv_file), "--no-plots", *flags])
        tables[flags] = [line.split(",")[:3] for line in csv_file.read_text().splitlines()[1:]]
    out = capsys.readouterr().out
    assert "probabilities: calibrated, softmax of logits /" in out and "probabilities: raw (--no-calibration)" in out
    assert out.count("too few to trust") == 1  # said with the calibrated probabilities only
    calibrated, raw = tables[()], tables[("--no-calibration",)]
    assert [row[:2] for row in calibrated] == [row[:2] for row in raw]  # the same class for every image
    assert [row[2] for row in calibrated] != [row[2] for row in raw]  # with other probabilities


def test_an_old_checkpoint_without_a_temperature_still_evaluates(trained_run, image_folder, tmp_path, capsys):
    with safe_open(trained_run / "best.safetensors", "pt") as file:
        metadata = {key: value for key, value in file.metadata().items() if key not in ("temperature", "calibration")}
    old = tmp_path / "old.safetensors"
    save_file(load_file(trained_run / "best.safetensors"), old, metadata=metadata)
    evaluate.main([str(old), "--data-dir", str(image_folder), "--no-plots"])
    assert "an uncalibrated checkpoint (no temperature" in capsys.readouterr().out
    evaluate.main([str(old), "--predict", str(next((image_folder / "test").rglob("*.jpg"))), "--no-plots"])
    assert "the checkpoint has no temperature" in capsys.readouterr().out


def test_a_temperature_at_an_end_of_the_search_is_flagged():
    enough = {"calibration": {"images": evaluate.FEW_FOR_CALIBRATION}}
    logits = torch.tensor([[1.0, 0.0]] * 8)
    for labels in (torch.zeros(8).long(), torch.ones(8).long()):  # all right: T goes to 0; all wrong: to infinity
        fitted = evaluate.fit_temperature(logits, labels)
        assert "an end of the range searched" in evaluate.calibration_caveat(enough | {"temperature": fitted})
    assert evaluate.calibration_caveat(enough | {"temperature": 1.3}) == ""
