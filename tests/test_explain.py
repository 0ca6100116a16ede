"""evaluate.py --explain: Grad-CAM heat maps of the mistakes and, with --predict, of each image."""

import pytest
import torch
from PIL import Image

import evaluate
from model import build_model


def test_grad_cam_maps_are_of_the_inputs_size_in_0_1_and_not_constant():
    torch.manual_seed(0)
    model = build_model(10, "cifar", "none").eval()  # a 4x4 last stage at 32x32
    inputs = torch.randn(3, 3, 32, 32)
    targets = torch.tensor([[0, 1, 2], [5, 5, 5]])
    maps = evaluate.grad_cam(model, inputs, targets)
    assert maps.shape == (2, 3, 32, 32) and maps.min() >= 0 and maps.max() <= 1 + 1e-6
    assert (maps.flatten(2).std(2) > 1e-3).all()  # every map shows some places more than others
    alone = evaluate.grad_cam(model, inputs[1:2], targets[:, 1:2])  # the batch does not mix images
    assert torch.allclose(alone[:, 0], maps[:, 1], atol=1e-5)


def test_explain_draws_the_mistakes_beside_their_maps(trained_run, image_folder, tmp_path, capsys, monkeypatch):
    checkpoint = str(trained_run / "best.safetensors")
    evaluate.main([checkpoint, "--data-dir", str(image_folder), "--plot-dir", str(tmp_path), "--explain"])
    assert str(tmp_path / "best_test_explained.png") in capsys.readouterr().out
    with Image.open(tmp_path / "best_test_explained.png") as image:
        assert image.width > 1000
    files = [str(p) for p in sorted((image_folder / "test").rglob("*.jpg"))[:5]]
    evaluate.main([checkpoint, "--predict", *files, "--plot-dir", str(tmp_path), "--explain"])
    assert (tmp_path / "best_predictions.png").is_file()
    capsys.readouterr()
    evaluate.main([checkpoint, "--data-dir", str(image_folder), "--plot-dir", str(tmp_path)])  # no --explain
    assert "removed best_test_explained.png, drawn by an earlier evaluation: pass --explain" in capsys.readouterr().out
    assert not (tmp_path / "best_test_explained.png").exists()  # it might show other mistakes than mistakes.png
    monkeypatch.setattr(evaluate, "top_confusions", lambda confusion, classes: [])  # as if all were right
    evaluate.main([checkpoint, "--data-dir", str(image_folder), "--plot-dir", str(tmp_path), "--explain"])
    out = capsys.readouterr().out
    assert "--explain: no mistakes on this split, so no heat maps to draw" in out
    assert "removed best_test_mistakes.png, drawn by an earlier evaluation: this one has no mistakes" in out
    assert not (tmp_path / "best_test_mistakes.png").exists()


def test_explain_with_no_plots_is_refused(capsys):
    with pytest.raises(SystemExit) as refused:
        evaluate.parse_args(["ckpt.safetensors", "--explain", "--no-plots"])
    assert refused.value.code == 2 and "--explain draws heat maps" in capsys.readouterr().err
