"""The quick-start notebook runs (on the embedded default model) so that it cannot rot, prints the
demo's numbers as the README quotes them, and shows no widget warning without ipywidgets."""
import os
import re

import nbformat
from nbclient import NotebookClient

HERE = os.path.dirname(__file__)
NOTEBOOK = os.path.join(HERE, "..", "notebooks", "quickstart.ipynb")
README = os.path.join(HERE, "..", "README.md")


def test_quickstart_notebook_runs(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "IProgress" not in outputs and "eval" in outputs  # the text progress bar
    printed = re.search(r"mean pixel AUROC (\d+\.\d) %, image AUROC (\d+\.\d) %", outputs)
    assert printed, outputs
    readme = open(README, encoding="utf-8").read()
    quoted = re.search(r"mean\s+pixel\s+AUROC\s+(\d+\.\d)\s+%\s+and\s+image\s+AUROC\s+(\d+\.\d)\s+%", readme)
    assert quoted and printed.groups() == quoted.groups()  # the README's numbers, which are the demo's
    assert "ANOMALY" in outputs and "normal" in outputs
