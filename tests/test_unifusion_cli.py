import pytest

from unifusion.cli import build_parser, main


def test_every_command_is_listed():
    text = build_parser().format_help()
    for command in ("generate", "edit", "info", "cache", "train", "lora", "export", "train-demo"):
        assert command in text


def test_train_demo_hands_its_arguments_to_the_demo_trainer(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train-demo", "--help"])
    assert info.value.code == 0
    assert "unifusion train-demo" in capsys.readouterr().out


def test_missing_checkpoint_is_a_clear_error_not_a_traceback(tmp_path, capsys):
    assert main(["info", str(tmp_path / "none.safetensors")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
