"""Your own images: photos of mixed sizes, a val/ folder, the memory check, and --predict."""

import csv
import json

import numpy as np
import pytest
import torch
from conftest import quick_args
from PIL import Image
from safetensors import safe_open

import data
import evaluate
import train
from model import decode_metadata

SIZES = [(120, 90), (90, 120), (100, 100), (180, 140)]  # photos: larger than small images (64), of several shapes


def write_photos(folder, classes, per_class, seed=0):
    """Images whose colour tells the class, of mixed sizes, as JPEG and PNG."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(classes):
        (folder / name).mkdir(parents=True)
        for i in range(per_class):
            width, height = SIZES[i % len(SIZES)]
            base = np.array([200 * label, 200 - 200 * label, 100], dtype=np.float32)
            pixels = np.clip(base + rng.normal(0, 30, (height, width, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / name / f"{i}.{'jpg' if i % 2 else 'png'}")


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    """DIR/train/{ant,bee}/ with 16 images each, DIR/val/ with 4 each, all larger than 32x32."""
    root = tmp_path_factory.mktemp("photos")
    write_photos(root / "train", ["ant", "bee"], 16)
    write_photos(root / "val", ["ant", "bee"], 4, seed=1)
    return root


@pytest.fixture(scope="module")
def photo_run(photo_folder, tmp_path_factory):
    """A one-epoch run on the photos at a 32x32 crop (stored 37x37), to keep it fast."""
    out = tmp_path_factory.mktemp("photo-run") / "run"
    flags = ["--batch-size", "8", "--epochs", "1", "--input-size", "32"]
    train.main(["--data-dir", str(photo_folder), "--output-dir", str(out), "--weights", "none", *flags])
    return out


def test_mixed_sizes_load_at_the_chosen_side_as_shorter_side_then_centre(tmp_path):
    folder = tmp_path / "train" / "stripes"
    folder.mkdir(parents=True)
    wide = np.zeros((40, 80, 3), dtype=np.uint8)
    wide[:, 20:60] = 255  # the centre square is white, the sides black
    Image.fromarray(wide).save(folder / "wide.png")
    Image.fromarray(np.full((90, 30, 3), 128, dtype=np.uint8)).save(folder / "tall.png")
    images, labels, classes = data.load_images(tmp_path, "train", side=20)
    assert images.shape == (2, 3, 20, 20) and images.dtype == torch.uint8
    by_name = dict(zip(sorted(["tall", "wide"]), images))
    assert by_name["wide"][:, :, 2:-2].min() > 240  # the centre was kept, not squeezed with its black sides
    assert (by_name["tall"] == 128).all()


def test_cifar_sized_folders_stay_32x32_and_photos_get_imagenet_sizes(image_folder, photo_folder):
    assert data.typical_side(data.list_images(image_folder, "train")[0]) == 32
    assert data.typical_side(data.list_images(photo_folder, "train")[0]) > 64
    cifar = train.parse_args(["--data-dir", str(image_folder)])
    train.data_settings(cifar, 32)
    assert (cifar.image_size, cifar.input_size, cifar.stem, cifar.train_crop) == (32, 32, "cifar", "padded")
    assert cifar.mean == data.CIFAR10_MEAN
    photos = train.parse_args(["--data-dir", str(photo_folder)])
    train.data_settings(photos, 375)
    assert (photos.image_size, photos.input_size, photos.eval_crop) == (256, 224, 224)
    assert (photos.stem, photos.train_crop, photos.mean) == ("imagenet", "random-resized", data.IMAGENET_MEAN)
    lr = train.RECIPE_VALUES["default"]["lr"]
    assert (photos.batch_size, photos.lr) == (32, lr * 32 / 128)  # few images: more steps
    assert (cifar.batch_size, cifar.lr) == (128, lr)
    chosen = train.parse_args(["--input-size", "160", "--stem", "cifar", "--batch-size", "64"])
    train.data_settings(chosen, 375)
    assert (chosen.image_size, chosen.input_size, chosen.stem) == (183, 160, "cifar")
    assert (chosen.batch_size, chosen.lr) == (64, lr * 64 / 128)  # explicit flags win; the lr follows the batch
    typed = train.parse_args(["--data-dir", str(photo_folder), "--batch-size", "32"])
    train.data_settings(typed, 375)
    assert (typed.batch_size, typed.lr) == (photos.batch_size, photos.lr)  # the default, typed: the same run
    for padding in ("4", "2"):  # 2, the recipe's own, typed: it pads no photo's crop either
        padded = train.parse_args(["--data-dir", str(photo_folder), "--crop-padding", padding])
        with pytest.raises(data.UserError, match=r"these are photos \(median shorter side 375 px\).*drop --crop-pad"):
            train.data_settings(padded, 375)


def test_random_resized_crop_draws_per_image_and_keeps_shapes():
    images = torch.randint(0, 256, (1, 3, 40, 40), dtype=torch.uint8).expand(64, -1, -1, -1)
    crops = data.random_resized_crop_flip(images, 24, torch.Generator().manual_seed(0))
    assert crops.shape == (64, 3, 24, 24) and crops.dtype == torch.float32
    assert 0 <= crops.min() and crops.max() <= 1
    assert len(crops.flatten(1).unique(dim=0)) == 64  # one image, 64 different crops
    again = data.random_resized_crop_flip(images, 24, torch.Generator().manual_seed(0))
    assert torch.equal(crops, again)  # the generator decides everything: a resumed epoch replays
    whole = data.augment(images[:4], torch.zeros(4), torch.Generator(), resized_crop=40, targeted_labels=torch.zeros(1))
    assert whole.shape == (4, 3, 40, 40)  # the targeted augmentation works at any size


def test_random_resized_crop_reads_nothing_back_from_the_device(monkeypatch):
    """On a GPU each read would wait for it (tests/test_host_sync.py counts them over whole steps)."""
    images = torch.randint(0, 256, (8, 3, 40, 40), dtype=torch.uint8)

    def read(*args, **kwargs):
        raise AssertionError("a read from the device")

    for name in ("item", "tolist", "__bool__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, read)
    data.augment(images, torch.zeros(8), torch.Generator(), resized_crop=24, targeted_labels=torch.zeros(1))


def test_evaluation_preprocessing_is_the_deterministic_centre_crop():
    images = torch.randint(0, 256, (3, 3, 37, 37), dtype=torch.uint8)
    normalize = data.normalizer((0.5,) * 3, (0.5,) * 3, 32, "cpu", crop=32)
    first, second = normalize(images), normalize(images)
    assert torch.equal(first, second) and first.shape == (3, 3, 32, 32)
    centre = images[..., 2:34, 2:34].float() / 255
    assert torch.allclose(first, (centre - 0.5) / 0.5)
    already_cropped = torch.rand(3, 3, 32, 32)  # training batches arrive at the crop size: untouched
    assert torch.allclose(normalize(already_cropped), (already_cropped - 0.5) / 0.5)


def test_a_photo_run_uses_the_val_folder_and_records_its_preprocessing(photo_run, photo_folder, capsys):
    history = json.loads((photo_run / "history.json").read_text())
    assert history[0]["val_samples"] == 8  # val/: 4 images a class; --val-fraction not used
    with safe_open(photo_run / "best.safetensors", "pt") as file:
        meta = decode_metadata(file.metadata())
    assert (meta["image_size"], meta["input_size"], meta["eval_crop"]) == (37, 32, 32)
    assert meta["train_crop"] == "random-resized" and meta["stem"] == "imagenet"
    assert "centre 32x32" in meta["preprocessing"]
    evaluate.main(
        [str(photo_run / "best.safetensors"), "--data-dir", str(photo_folder), "--split", "val", "--no-plots"]
    )
    report = capsys.readouterr().out
    assert "val split, TTA off: 8 images" in report and "the run's own data" in report


def test_the_log_says_where_validation_comes_from_and_the_sizes(photo_folder, tmp_path, capsys):
    train.main(
        quick_args(photo_folder, tmp_path / "run", "--batch-size", "8", "--epochs", "1", "--max-train-samples", "8")
    )
    printed = capsys.readouterr().out
    assert f"validation: {photo_folder / 'val'} (--val-fraction is not used)" in printed
    assert "random-resized crop" in printed and "8 train / 8 val images" in printed
    assert "the --max-train-samples subset is decoded into memory; the cache in" in printed
    with pytest.raises(SystemExit):  # val/ is the validation split: a fraction would do nothing
        train.main(quick_args(photo_folder, tmp_path / "other", "--val-fraction", "0.2"))  # the default, typed
    assert (
        f"error: --val-fraction cuts the validation split from train/, and {photo_folder / 'val'} is the validation "
        f"split here; drop --val-fraction" in capsys.readouterr().err
    )
    assert not (tmp_path / "other").exists()


def test_jpegs_marked_as_rotated_are_loaded_upright(tmp_path):
    folder = tmp_path / "train" / "phone"
    folder.mkdir(parents=True)
    pixels = np.zeros((40, 60, 3), dtype=np.uint8)
    pixels[:, :30] = 255  # left half white: stored sideways, as a phone does, with EXIF orientation 6
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to show
    Image.fromarray(pixels).save(folder / "sideways.jpg", exif=exif)
    Image.fromarray(pixels).save(folder / "plain.jpg")
    images, _, _ = data.load_images(tmp_path, "train", side=40)
    plain, upright = images  # sorted: plain.jpg, sideways.jpg
    assert plain[:, :, :15].float().mean() > 200 and plain[:, :, -15:].float().mean() < 50
    assert upright[:, :15].float().mean() > 200 and upright[:, -15:].float().mean() < 50  # white on top now


def test_a_class_whose_images_cannot_be_read_stops_the_run(tmp_path, capsys):
    write_photos(tmp_path / "train", ["ant", "bee"], 4)
    for path in (tmp_path / "train" / "bee").iterdir():
        path.write_bytes(b"not an image")
    with pytest.raises(SystemExit, match=r"^error: none of the train images of class 'bee' could be read"):
        train.main(quick_args(tmp_path, tmp_path / "run", "--batch-size", "2", "--val-fraction", "0.5"))
    assert "warning: skipped" in capsys.readouterr().out and not (tmp_path / "run").exists()


def test_evaluate_finds_the_run_s_own_data_without_data_dir(photo_run, capsys):
    evaluate.main([str(photo_run / "best.safetensors"), "--split", "val", "--no-plots"])
    assert "8 images" in capsys.readouterr().out


def test_a_val_folder_with_other_classes_is_refused(photo_folder, tmp_path):
    write_photos(tmp_path / "train", ["ant", "bee"], 4)
    write_photos(tmp_path / "valid", ["ant", "wasp"], 2)
    with pytest.raises(SystemExit, match=r"^error: .*valid has the classes \['ant', 'wasp'\]") as refusal:
        train.main(quick_args(tmp_path, tmp_path / "run", "--batch-size", "2"))
    assert "\n" not in str(refusal.value.code) and not (tmp_path / "run").exists()


def test_the_memory_check_refuses_before_decoding(photo_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "available_memory", lambda: 100_000)  # 100 kB free
    decoded = []
    monkeypatch.setattr(data, "read_image", lambda *args: decoded.append(args))
    with pytest.raises(SystemExit) as refusal:
        train.main([
            "--data-dir", str(photo_folder), "--output-dir", str(tmp_path / "run"), "--weights", "none",
            "--data-on", "device",
        ])  # fmt: skip
    message = str(refusal.value.code)
    assert (
        message.startswith("error: 40 images at 256x256 and training need 0.76 GiB in memory")
        and "pass --data-on disk, or" in message
        and "--input-size" in message
    )
    assert decoded == [] and not (tmp_path / "run").exists()


def test_predictions_of_a_trained_model_go_to_the_screen_a_csv_and_contact_sheets(
    photo_run, photo_folder, tmp_path, capsys
):
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "notes.txt").write_text("not an image")
    (tmp_path / "new" / "broken.jpg").write_bytes(b"not a jpeg")
    write_photos(tmp_path / "new", ["more"], 3, seed=2)
    single = photo_folder / "val" / "ant" / "0.png"
    table = tmp_path / "out" / "predictions.csv"
    evaluate.main(
        [
            str(photo_run / "best.safetensors"),
            "--predict",
            str(tmp_path / "new"),
            str(single),
            "--csv",
            str(table),
            "--plot-dir",
            str(tmp_path / "sheets"),
        ]
    )
    printed = capsys.readouterr().out
    assert "skipped 1 unreadable image(s)" in printed
    rows = list(csv.DictReader(table.open()))
    assert [row["path"] for row in rows] == [
        *(str(tmp_path / "new" / "more" / f"{i}.{ext}") for i, ext in ((0, "png"), (1, "jpg"), (2, "png"))),
        str(single),
    ]
    for row in rows:
        assert row["class"] in ("ant", "bee") and 0.5 <= float(row["probability"]) <= 1
        assert row["top_2"].startswith(f"{row['class']} ") and len(row["top_2"].split("; ")) == 2
        assert row["path"] in printed
    assert [p.name for p in (tmp_path / "sheets").iterdir()] == ["best_predictions.png"]


def test_predict_works_for_a_cifar_checkpoint_and_splits_many_images_into_sheets(
    trained_run, tmp_path, monkeypatch, capsys
):
    write_photos(tmp_path / "photos", ["any"], 5)
    monkeypatch.setattr(evaluate, "SHEET_ROWS", 1)
    monkeypatch.setattr(evaluate, "SHEET_COLUMNS", 2)
    evaluate.main(
        [
            str(trained_run / "best.safetensors"),
            "--predict",
            str(tmp_path / "photos"),
            "--plot-dir",
            str(tmp_path / "sheets"),
            "--top-k",
            "10",
        ]
    )
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(str(tmp_path))]
    assert len(lines) == 5 and all(line.count("%") == 10 for line in lines)  # all 10 classes
    assert sorted(p.name for p in (tmp_path / "sheets").iterdir()) == [f"best_predictions_{n}.png" for n in (1, 2, 3)]


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda root: (root / "empty").mkdir(), "no images there"),
        (lambda root: None, "does not exist"),
    ],
)
def test_a_predict_path_without_images_is_one_error_line(make, words, trained_run, tmp_path):
    make(tmp_path)
    with pytest.raises(SystemExit) as refusal:
        evaluate.main([str(trained_run / "best.safetensors"), "--predict", str(tmp_path / "empty")])
    assert str(refusal.value.code).startswith("error: --predict") and words in str(refusal.value.code)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["empty"] if words.startswith("no") else [])


def test_evaluate_draws_the_most_confident_mistakes(trained_run, image_folder, tmp_path):
    evaluate.main(
        [
            str(trained_run / "best.safetensors"),
            "--data-dir",
            str(image_folder),
            "--split",
            "val",
            "--plot-dir",
            str(tmp_path),
        ]
    )
    with Image.open(tmp_path / "best_val_mistakes.png") as image:
        assert image.width > 600
