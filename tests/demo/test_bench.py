"""The benchmark table: formatting and merging saved figures (the scoring itself runs in the
train-demo quick test, on a real pipeline)."""

from __future__ import annotations

import json

from unifusion.demo.bench import format_table, main


def test_table_puts_attributes_in_columns_and_other_metrics_last():
    rows = {"t2i": {"colour": 0.95, "kind": 0.5, "size": 1.0, "position": 0.9, "count": 1.0, "exact": 0.4},
            "reconstruction, 2 tiles": {"exact": 0.25, "psnr": 21.456}}
    lines = format_table(rows).splitlines()
    assert lines[0].startswith("| run | colour | shape |") and len(lines) == 4
    assert lines[2] == "| t2i | 95% | 50% | 100% | 90% | 100% | 40% |  |"
    assert lines[3] == "| reconstruction, 2 tiles |  |  |  |  |  | 25% | psnr 21.46 |"


def test_merge_prints_one_table_from_saved_parts(tmp_path, capsys):
    model, ablations = tmp_path / "model.json", tmp_path / "ablations.json"
    model.write_text(json.dumps({"edit, one reference": {"success": 0.8, "identity": 0.9}}))
    ablations.write_text(json.dumps({"ablation: mean of the selected layers": {"colour": 0.5}}))
    assert main(["--merge", str(model), str(ablations)]) == 0
    out = capsys.readouterr().out
    assert "| edit, one reference |  |  |  |  |  |  | success 80%, identity 90% |" in out
    assert "| ablation: mean of the selected layers | 50% |" in out
