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


def test_readme_command_draws_the_prompt_with_the_bundled_demo(tmp_path, capsys):
    """`unifusion generate` with no model options uses the shipped demo model; the scorer reads
    the prompt's colour and shape back out of the picture."""
    import numpy as np
    from PIL import Image

    from unifusion.bundled import demo_files
    from unifusion.demo.scorer import read_scene

    demo_files()  # the demo model ships with the package: no skip when it is missing
    out = tmp_path / "circle.png"
    assert main(["generate", "a large red circle in the center", "-o", str(out)]) == 0
    assert capsys.readouterr().out.strip().endswith("circle.png")
    shapes = read_scene(np.asarray(Image.open(out).convert("RGB"))).shapes
    assert any(s.colour == "red" and s.kind == "circle" for s in shapes), shapes


def test_bench_is_listed_with_its_options():
    text = build_parser().format_help()
    assert "bench" in text
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
