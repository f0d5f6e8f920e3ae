"""Execute a notebook in a temporary directory and store its results, without the logs.

The stored outputs are what a reader should see: printed results, tables and figures. Log streams
(stderr: Ray's and the libraries' progress lines and warnings, which name machine paths) and the
lines Ray's raylet prints into stdout are left out; running the notebook shows them.

    python examples/execute_notebook.py examples/quickstart.ipynb
"""

from __future__ import annotations

import sys
import tempfile

import nbformat
from nbclient import NotebookClient


def execute(path: str) -> None:
    notebook = nbformat.read(path, as_version=4)
    with tempfile.TemporaryDirectory(prefix="raydpo-notebook-") as directory:
        NotebookClient(
            notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": directory}}
        ).execute()
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs = [output for output in map(_without_logs, cell.outputs) if output is not None]
    nbformat.write(notebook, path)


def _without_logs(output):
    if output.output_type != "stream":
        return output
    if output.get("name") == "stderr":
        return None
    lines = [line for line in output.text.splitlines(keepends=True) if "(raylet)" not in line]
    text = "".join(lines).lstrip("\n")
    if not text.strip():
        return None
    output.text = text
    return output


if __name__ == "__main__":
    for name in sys.argv[1:] or ["examples/quickstart.ipynb"]:
        execute(name)
