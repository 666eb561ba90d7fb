"""Keep the notebooks' stored outputs true: a fingerprint of the toolkit's source, and in-place re-execution.

Each notebook's first code cell prints `toolkit.notebook.refresh.source_fingerprint()`. nbval re-runs that cell
and compares, and tests/test_notebooks_fresh.py compares without running anything, so a notebook whose outputs
came from older code fails the test suite until `make notebooks-refresh` re-executes it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]
STAMP_CALL = "source_fingerprint()"


def source_fingerprint(root: Path = PACKAGE) -> str:
    """A short hash of every .py file under the toolkit package, by relative path and content."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(b"\0")
        digest.update(path.read_bytes())
        digest.update(b"\0")
    return f"toolkit source {digest.hexdigest()[:16]}"


def stored_fingerprint(notebook: Path) -> str | None:
    """The fingerprint a notebook's stamp cell printed when it was last executed, or None if it has no stamp."""
    cells = json.loads(notebook.read_text())["cells"]
    for cell in cells:
        if cell["cell_type"] == "code" and STAMP_CALL in "".join(cell["source"]):
            for output in cell.get("outputs", []):
                text = output.get("data", {}).get("text/plain") or output.get("text")
                if text:
                    return "".join(text).strip().strip("'\"")
            return ""
    return None


def refresh(notebook: Path, timeout_s: int = 600) -> float:
    """Execute `notebook` in place from its own directory, keeping widget state; returns the seconds it took."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(notebook, as_version=4)
    started = time.perf_counter()
    client = NotebookClient(nb, timeout=timeout_s, kernel_name="python3", store_widget_state=True,
                            resources={"metadata": {"path": str(notebook.parent)}})
    client.execute()
    nbformat.write(nb, notebook)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="re-execute notebooks in place on the current toolkit")
    parser.add_argument("notebooks", nargs="+", type=Path)
    args = parser.parse_args(argv)
    for notebook in args.notebooks:
        print(f"{notebook}: {refresh(notebook):.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
