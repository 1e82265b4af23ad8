"""init-checkpoint writes a new folder: an existing folder with files in it (a real checkpoint, say) is
refused with one line and left as it is."""

from __future__ import annotations

import pytest

from cellstrata.cli import main


def tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("files", [{"best_model.pt": b"real weights", "args.json": b"{}"}, {"notes.txt": b"mine"}])
def test_a_folder_with_files_is_never_overwritten(tmp_path, capsys, files):
    out = tmp_path / "scGPT_human"
    out.mkdir()
    for name, data in files.items():
        (out / name).write_bytes(data)
    assert main(["init-checkpoint", "--model", "scgpt", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cellstrata: error: ") and err.count("\n") == 1
    assert "is not empty" in err and "nothing was changed" in err
    assert tree(out) == files


def test_a_file_or_an_empty_folder(tmp_path, capsys):
    (tmp_path / "f").write_text("a file")
    assert main(["init-checkpoint", "--model", "scgpt", "--out", str(tmp_path / "f")]) == 2
    assert "nothing was changed" in capsys.readouterr().err and (tmp_path / "f").read_text() == "a file"
    (tmp_path / "empty").mkdir()
    assert main(["init-checkpoint", "--model", "scgpt", "--out", str(tmp_path / "empty")]) == 0
    assert (tmp_path / "empty" / "best_model.pt").exists()
