import pytest
import torch
from conftest import CLASSES

import data


def test_split_is_stratified_disjoint_and_deterministic():
    labels = torch.arange(10).repeat_interleave(50)
    train, val = data.stratified_split(labels, 0.2, seed=0)
    assert len(set(train.tolist()) & set(val.tolist())) == 0
    assert sorted(train.tolist() + val.tolist()) == list(range(500))
    assert torch.bincount(labels[val]).tolist() == [10] * 10
    again_train, again_val = data.stratified_split(labels, 0.2, seed=0)
    assert torch.equal(val, again_val) and torch.equal(train, again_train)
    _, other_val = data.stratified_split(labels, 0.2, seed=1)
    assert not torch.equal(val, other_val)


def test_max_train_samples_is_a_stratified_subset_and_keeps_the_validation_split():
    labels = torch.arange(10).repeat_interleave(50)
    full_train, full_val = data.train_val_indices(labels, list("abcdefghij"), 0.2, seed=0)
    train, val = data.train_val_indices(labels, list("abcdefghij"), 0.2, seed=0, max_train_samples=100)
    assert torch.equal(val, full_val)
    assert set(train.tolist()) <= set(full_train.tolist())
    assert torch.bincount(labels[train]).tolist() == [10] * 10


def test_max_train_samples_above_the_training_count_keeps_all_and_says_so(capsys):
    labels = torch.arange(10).repeat_interleave(50)
    full_train, _ = data.train_val_indices(labels, list("abcdefghij"), 0.2, seed=0)
    train, _ = data.train_val_indices(labels, list("abcdefghij"), 0.2, seed=0, max_train_samples=10**6)
    assert torch.equal(train, full_train)
    assert "--max-train-samples 1000000 is not below the 400 training images: all used" in capsys.readouterr().out


def test_image_folder_loads_every_image_with_sorted_class_names(image_folder):
    images, labels, classes = data.load_images(image_folder, "train")
    assert classes == sorted(CLASSES)
    assert images.shape == (200, 3, 32, 32) and images.dtype == torch.uint8
    assert torch.bincount(labels).tolist() == [20] * 10


def test_fake_cifar_loads_through_torchvision(fake_cifar, trust_fake_cifar):
    images, labels, classes = data.load_images(fake_cifar, "train")
    assert classes == CLASSES
    assert images.shape == (100, 3, 32, 32)
    test_images, _, _ = data.load_images(fake_cifar, "test")
    assert len(test_images) == 30


def test_crop_and_flip_are_drawn_per_image():
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    generator = torch.Generator().manual_seed(0)
    flipped = data.random_crop_flip(images, 0, generator)
    same = (flipped == images).flatten(1).all(1)
    mirrored = (flipped == images.flip(3)).flatten(1).all(1)
    assert (same | mirrored).all() and same.any() and mirrored.any()
    cropped = data.random_crop_flip(images, 4, generator)
    assert cropped.shape == images.shape
    # a shifted crop brings in zero padding on some rows or columns of some images, not all
    has_padding = (cropped == 0).flatten(1).sum(1) > (images == 0).flatten(1).sum(1)
    assert 0 < has_padding.sum() < 64


def test_normalize_resizes_to_the_input_size_only_when_it_differs():
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    same = data.normalizer((0.5,) * 3, (0.5,) * 3, 32, "cpu")(images)
    assert same.shape == (4, 3, 32, 32) and same.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(same, images.float() / 127.5 - 1)
    larger = data.normalizer((0.5,) * 3, (0.5,) * 3, 48, "cpu")(images)
    assert larger.shape == (4, 3, 48, 48) and larger.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(larger.mean((2, 3)), same.mean((2, 3)), atol=0.05)  # the same images, upsampled


def test_targeted_augmentation_changes_only_the_chosen_classes():
    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(40) % 10
    generator = torch.Generator().manual_seed(0)
    plain = data.augment(images, labels, torch.Generator().manual_seed(0), padding=0)
    targeted = data.augment(images, labels, generator, padding=0, targeted_labels=torch.tensor([3, 5]))
    changed = (plain != targeted).flatten(1).any(1)
    assert changed[(labels == 3) | (labels == 5)].all()
    assert not changed[(labels != 3) & (labels != 5)].any()


def test_a_class_named_like_a_targeting_word_is_refused_not_guessed():
    classes = ["all", "animals", "none"]  # 'all' augmented every class, 'animals' was refused as naming none
    for word, meaning in (("all", "every class"), ("animals", "a group of classes")):
        with pytest.raises(data.UserError, match=f"a class here is named '{word}' too, the word for {meaning}"):
            data.class_indices(word, classes)
    assert data.class_indices("none", classes) == [] and data.class_indices("all,none", classes) == [0, 2]


def test_groups_cover_cifar_classes_and_skip_unknown_names():
    groups = data.group_of_classes(CLASSES)
    assert [CLASSES[i] for i in groups["vehicles"]] == ["airplane", "automobile", "ship", "truck"]
    assert data.group_of_classes(["a", "b"]) is None


def test_folder_without_images_is_a_clear_error(tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    with pytest.raises(data.UserError, match="cat holds no images"):
        data.load_images(tmp_path, "train")


def test_unreadable_images_are_skipped_and_counted(tmp_path, image_folder, capsys):
    import shutil

    shutil.copytree(image_folder / "train", tmp_path / "train")
    (tmp_path / "train" / "cat" / "broken.png").write_bytes(b"not an image")
    images, _, _ = data.load_images(tmp_path, "train")
    assert len(images) == 200
    assert "skipped 1 unreadable image" in capsys.readouterr().out


def test_cifar_download_failure_names_the_offline_way(tmp_path, monkeypatch):
    import torchvision

    def no_network(self):
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", no_network)
    with pytest.raises(data.UserError, match="--data-dir"):
        data.load_images(tmp_path, "train")


def test_a_damaged_cifar10_copy_is_named_not_downloaded_over(fake_cifar):
    # the fake batches fail torchvision's checksums, as a copy cut short or edited would
    with pytest.raises(data.UserError, match="cifar-10-batches-py is incomplete or damaged .*; replace it"):
        data.load_images(fake_cifar, "train")
