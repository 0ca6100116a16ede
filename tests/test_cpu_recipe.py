"""--recipe cpu: its settings, and the precision it chooses: bf16 where the CPU has bf16 instructions,
float32 where it has not, and whatever the user chose when they chose."""

import pytest

import train


@pytest.fixture
def a_cpu(monkeypatch, tmp_path):
    """A CPU-only machine with a plain launch: no GPU, no precision chosen, no accelerate config file."""
    monkeypatch.setattr(train.torch.accelerator, "is_available", lambda: False)
    monkeypatch.setattr(train, "LAUNCHER", ([b"accelerate", b"launch", b"train.py"], [b"HOME=/home/you"]))
    monkeypatch.setattr(train, "default_config_file", str(tmp_path / "no-config.yaml"))


def test_the_cpu_recipe_takes_bf16_only_where_the_cpu_has_its_instructions(a_cpu, monkeypatch):
    args = train.parse_args(["--recipe", "cpu"])
    monkeypatch.setattr(train, "cpu_flags", lambda: {"sse4_2", "avx2", "avx512f"})  # a CPU made to lack them
    precision, why = train.cpu_precision(args)
    assert precision == "no" and "neither AVX512-BF16 nor AMX" in why
    monkeypatch.setattr(train, "cpu_flags", lambda: {"avx2", "avx512f", "amx_bf16", "amx_tile"})
    precision, why = train.cpu_precision(args)
    assert precision == "bf16" and "amx_bf16" in why
    assert train.cpu_precision(train.parse_args([])) == (None, None)  # the other recipes: as launched
    assert train.cpu_precision(train.parse_args(["--recipe", "seed"])) == (None, None)


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
    assert train.cpu_precision(train.parse_args(["--recipe", "cpu"])) == (None, None)


def test_python_train_py_with_the_variable_set_by_hand_is_a_choice(a_cpu, monkeypatch):
    monkeypatch.setattr(train, "LAUNCHER", None)
    monkeypatch.setattr(train, "cpu_flags", lambda: {"avx512_bf16"})
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert train.cpu_precision(train.parse_args(["--recipe", "cpu"]))[0] == "bf16"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    assert train.cpu_precision(train.parse_args(["--recipe", "cpu"])) == (None, None)


def test_the_cpu_recipe_keeps_32x32_and_the_from_scratch_lr():
    args = train.parse_args(["--recipe", "cpu", "--weights", "none"])
    train.data_settings(args, 32)
    assert (args.stem, args.input_size, args.lr, args.epochs) == ("imagenet", 32, train.SCRATCH_LR, 22)


def test_a_resumed_cpu_run_keeps_the_precision_it_ran_in(a_cpu, monkeypatch, tmp_path):
    monkeypatch.setattr(train, "cpu_flags", lambda: {"amx_bf16"})
    state = tmp_path / "run" / "state"
    state.mkdir(parents=True)
    config = {"recipe": "cpu", "mixed_precision": "no"}  # launched with --mixed_precision no
    (state / "progress.json").write_text(train.json.dumps({"config": config, "history": []}))
    args = train.parse_args(["--output-dir", str(tmp_path / "run"), "--resume"])  # the printed resume command
    precision, why = train.cpu_precision(args)
    assert precision == "no" and "the run's own" in why
