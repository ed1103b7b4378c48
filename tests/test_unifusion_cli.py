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


def readme_generate_command() -> list[str]:
    """The first `unifusion generate` line of the README, as arguments."""
    import shlex
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    line = next(line for line in readme.splitlines() if line.startswith("unifusion generate "))
    return shlex.split(line)[1:]


def test_readme_command_draws_the_prompt_with_the_bundled_demo(tmp_path, capsys):
    """The README's main command, as printed there, uses the shipped demo model; the scorer reads
    the prompt's colour, size and place back out of the picture. (Its shape is left out: the demo
    has not learned shapes, see the README's benchmark table.)"""
    import numpy as np
    from PIL import Image

    from unifusion.bundled import demo_files
    from unifusion.demo.scorer import read_scene

    demo_files()  # the demo model ships with the package: no skip when it is missing
    args = readme_generate_command()
    assert args[:2] == ["generate", "a large red circle in the top left"], args
    out = tmp_path / args[args.index("-o") + 1]
    args[args.index("-o") + 1] = str(out)
    assert main(args) == 0
    assert capsys.readouterr().out.strip().endswith(out.name)
    shapes = read_scene(np.asarray(Image.open(out).convert("RGB"))).shapes
    assert any((s.colour, s.size, s.row, s.col) == ("red", "large", 0, 0) for s in shapes), shapes


def test_bench_is_listed_with_its_options():
    text = build_parser().format_help()
    assert "bench" in text
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
