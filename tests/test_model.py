import io
import zipfile

import pytest
import torch
import torchvision
from safetensors.torch import load_file, save_file

from data import UserError
from model import build_model, load_checkpoint, save_checkpoint


def test_head_swap_keeps_the_file_backbone_and_adds_a_new_head(weights_file):
    source = torch.load(weights_file, weights_only=True)
    model = build_model(10, stem="imagenet", weights=str(weights_file))
    state = model.state_dict()
    for key, value in source.items():
        if not key.startswith("fc."):
            assert torch.equal(state[key], value), key
    assert state["fc.weight"].shape == (10, 512)


def test_cifar_stem_keeps_pretrained_conv_at_stride_one(weights_file):
    model = build_model(10, stem="cifar", weights=str(weights_file))
    assert model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, torch.nn.Identity)
    assert torch.equal(model.conv1.weight, torch.load(weights_file, weights_only=True)["conv1.weight"])
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_safetensors_weights_are_accepted(weights_file, tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(torch.load(weights_file, weights_only=True), path)
    model = build_model(10, weights=str(path))
    assert torch.equal(model.layer4[1].bn2.weight, load_file(path)["layer4.1.bn2.weight"])


def zip_of_text():
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as file:
        file.writestr("notes.txt", "not weights")
    return archive.getvalue()


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "not found"),
        (b"garbage", "could not read"),
        (b"hello\n", r"\(not a file torch.save or safetensors"),
        (b"", "not a file"),
        (bytes(range(206, 256)), r"\(not a file torch.save or safetensors wrote\)"),  # torch: "Unsupported operand"
        (zip_of_text(), r"\(a truncated torch.save file, or another kind of zip\)"),
    ],
)
def test_bad_weights_file_is_a_clear_error(tmp_path, content, message):
    path = tmp_path / "w.pth"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        build_model(10, weights=str(path))


def test_weights_holding_nan_are_refused_as_read_not_as_a_nan_loss(tmp_path):
    state = torchvision.models.resnet18().state_dict()
    state["layer2.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(UserError, match=r"holds NaN or infinite values \(layer2.0.conv1.weight\)"):
        build_model(10, weights=str(tmp_path / "w.pth"))
    state = {key: value.double() if value.is_floating_point() else value for key, value in state.items()}
    state["layer2.0.conv1.weight"][0, 0, 0, 0] = 1e300  # finite in float64, inf in the network's float32
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(UserError, match=r"holds NaN or infinite values \(layer2.0.conv1.weight\)"):
        build_model(10, weights=str(tmp_path / "w.pth"))
    state["layer2.0.conv1.weight"][0, 0, 0, 0] = 0.0
    state["fc.weight"][0, 0] = float("inf")  # the head is replaced: its values do not matter
    torch.save(state, tmp_path / "w.pth")
    build_model(10, weights=str(tmp_path / "w.pth"))


@pytest.mark.parametrize(
    "key, change, message",
    [
        ("layer1.0.conv1.weight", lambda t: t.to(torch.complex64), r"holds complex64 values \(layer1.0.conv1.weight\)"),
        ("layer3.1.bn2.running_var", lambda t: -t, r"negative BatchNorm variances \(layer3.1.bn2.running_var\)"),
        ("layer1.0.conv1.weight", lambda t: t.to_sparse(), r"holds sparse_coo tensors \(layer1.0.conv1.weight\)"),
        ("layer1.0.conv1.weight", lambda t: t.to("meta"), r"holds meta tensors, without values \(layer1.0.conv1"),
        (5, lambda t: torch.zeros(3), "holds no state dict"),  # a key that is not a name
    ],
)
def test_weights_no_training_leaves_are_refused_not_loaded_with_a_warning(tmp_path, key, change, message):
    state = torchvision.models.resnet18().state_dict()
    state[key] = change(state.get(key))
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(UserError, match=message):
        build_model(10, weights=str(tmp_path / "w.pth"))


def test_a_training_checkpoint_as_weights_names_the_state_dict_inside_it(tmp_path):
    path = tmp_path / "last.ckpt.pth"  # Lightning's layout: the state dict beside the loop's counters
    torch.save({"epoch": 3, "state_dict": torchvision.models.resnet18().state_dict()}, path)
    with pytest.raises(UserError, match=r"holds no state dict; its 'state_dict' is one: torch.save\(checkpoint\["):
        build_model(10, weights=str(path))


def test_a_whole_pickled_model_as_weights_says_to_save_its_state_dict(tmp_path):
    path = tmp_path / "model.pth"
    torch.save(torchvision.models.resnet18(), path)  # the model, not its state_dict(): weights_only refuses it
    with pytest.raises(UserError) as refused:
        build_model(10, weights=str(path))
    message = str(refused.value)
    assert "pickled objects (torchvision.models.resnet.ResNet)" in message and "save model.state_dict()" in message
    assert "Weights only" not in message and "\n" not in message


def test_weights_of_another_model_name_the_first_mismatch(tmp_path):
    path = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34().state_dict(), path)
    with pytest.raises(UserError, match="not a torchvision resnet18 state dict: unexpected key"):
        build_model(10, weights=str(path))


def test_checkpoint_round_trip_and_plain_torchvision_loading(tmp_path):
    model = build_model(10, stem="imagenet", weights="none")
    metadata = {"arch": "resnet18", "stem": "imagenet", "classes": list("abcdefghij"), "epoch": 3, "val_acc": 0.5}
    metadata |= {"mean": [0.5] * 3, "std": [0.5] * 3, "seed": 0, "val_fraction": 0.2}
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(model.to(memory_format=torch.channels_last), path, metadata)
    loaded, read = load_checkpoint(path)
    assert read == metadata
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    plain = torchvision.models.resnet18(num_classes=10)
    plain.load_state_dict(load_file(path))  # no wrapper prefix, torchvision's key names
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.safetensors"]  # no temporary left


def test_two_stage_head_gives_log_probabilities_through_the_groups():
    groups = [[0, 1, 8, 9], [2, 3, 4, 5, 6, 7]]
    model = build_model(10, stem="imagenet", weights="none", groups=groups).eval()
    with torch.no_grad():
        log_probs = model(torch.randn(4, 3, 32, 32))
        assert torch.allclose(log_probs.exp().sum(1), torch.ones(4), atol=1e-5)
        features = torch.randn(4, 512)
        stage1 = model.fc.group(features).softmax(1)
        mass = model.fc(features).exp()
        assert torch.allclose(mass[:, groups[0]].sum(1), stage1[:, 0], atol=1e-5)


def test_two_stage_checkpoint_round_trip(tmp_path):
    groups = [[0, 1, 8, 9], [2, 3, 4, 5, 6, 7]]
    model = build_model(10, stem="imagenet", weights="none", groups=groups)
    path = tmp_path / "two.safetensors"
    save_checkpoint(
        model,
        path,
        {"arch": "resnet18", "stem": "imagenet", "classes": list("abcdefghij"), "groups": groups}
        | {"mean": [0.5] * 3, "std": [0.5] * 3, "seed": 0, "val_fraction": 0.2},
    )
    loaded, _ = load_checkpoint(path)
    assert torch.equal(loaded.fc.group_of, model.fc.group_of)
    assert torch.equal(loaded.fc.group.weight, model.fc.group.weight)


def test_offline_imagenet_download_names_the_alternatives(monkeypatch):
    def offline(self, *args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.__class__, "get_state_dict", offline)
    with pytest.raises(UserError, match="--weights PATH .* or --weights none"):
        build_model(10, weights="imagenet")


@pytest.mark.parametrize(
    "edit, says",
    [
        (dict(mean=[0.5, 0.5]), "its mean is [0.5, 0.5], not 3 numbers"),
        (dict(std=[0.5, 0.0, 0.5]), "its std is [0.5, 0.0, 0.5], not 3 numbers above 0"),
        (dict(image_size="abc"), "its image_size is 'abc', not a whole number above 0"),
        (dict(input_size=0), "its input_size is 0, not a whole number above 0"),
        (dict(temperature=-1.0), "its temperature is -1.0, not a number above 0"),  # it would reverse the ranking
        (dict(eval_crop=64), "its eval_crop 64 is larger than the stored side of its images, 32"),
    ],
)
def test_a_checkpoint_whose_metadata_was_edited_is_refused_in_one_line(edit, says, tmp_path):
    metadata = dict(arch="resnet18", stem="imagenet", classes=["a", "b"], mean=[0.5] * 3, std=[0.5] * 3, seed=0)
    metadata |= dict(val_fraction=0.2, image_size=32, input_size=32, eval_crop=32, temperature=1.5)
    save_checkpoint(build_model(2, "imagenet", "none"), tmp_path / "ok.safetensors", metadata)
    assert load_checkpoint(tmp_path / "ok.safetensors")[1]["temperature"] == 1.5
    save_checkpoint(build_model(2, "imagenet", "none"), tmp_path / "edited.safetensors", metadata | edit)
    with pytest.raises(UserError, match="cannot be evaluated as trained") as refused:
        load_checkpoint(tmp_path / "edited.safetensors")
    assert says in str(refused.value)
