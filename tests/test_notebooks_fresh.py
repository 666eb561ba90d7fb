"""Stored notebook outputs come from the code under test: each notebook's stamp equals the current fingerprint."""

from __future__ import annotations

from pathlib import Path

import pytest

from toolkit.notebook.refresh import source_fingerprint, stored_fingerprint

NOTEBOOKS = sorted(Path(__file__).resolve().parents[1].glob("notebooks/*.ipynb"))


def test_there_are_notebooks() -> None:
    assert len(NOTEBOOKS) >= 7


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_stored_outputs_come_from_this_code(notebook: Path) -> None:
    stored = stored_fingerprint(notebook)
    assert stored is not None, f"{notebook.name} has no stamp cell calling source_fingerprint()"
    assert stored == source_fingerprint(), (
        f"{notebook.name} was executed on other code ({stored!r}, now {source_fingerprint()!r}): "
        "run `make notebooks-refresh` and commit the notebooks"
    )


def test_fingerprint_follows_the_source(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("x = 1\n")
    before = source_fingerprint(tmp_path)
    (tmp_path / "a.py").write_text("x = 2\n")
    assert source_fingerprint(tmp_path) != before
