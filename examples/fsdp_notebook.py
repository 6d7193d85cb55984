"""Execute examples/fsdp_two_gpus.ipynb in place: the cells tagged ``device`` (default) or all of them (--all).

    python examples/fsdp_notebook.py          # after copying the device results: fills the "On two GPUs" cells only
    python examples/fsdp_notebook.py --all    # everything (the CPU runs take ~10 minutes on 2 cores)

Needs nbclient, nbformat and ipykernel (``pip install nbclient ipykernel``; they are not quickloris dependencies).
Outputs of the cells that are not executed are kept as they are.
"""

from __future__ import annotations

import argparse
from pathlib import Path

NOTEBOOK = Path(__file__).resolve().with_name("fsdp_two_gpus.ipynb")


def main() -> None:
    import nbformat
    from nbclient import NotebookClient

    p = argparse.ArgumentParser()
    p.add_argument("--all", action="store_true", help="execute every cell, not only those tagged device")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per cell")
    args = p.parse_args()
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        nb, timeout=args.timeout, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    )
    with client.setup_kernel():
        for index, cell in enumerate(nb.cells):
            if cell.cell_type == "code" and (args.all or "device" in cell.metadata.get("tags", [])):
                print(f"executing cell {index}", flush=True)
                client.execute_cell(cell, index)
    tmp = NOTEBOOK.with_suffix(".ipynb.tmp")
    nbformat.write(nb, tmp)
    tmp.replace(NOTEBOOK)  # atomic: a failed run leaves the previous notebook
    print(f"wrote {NOTEBOOK}")


if __name__ == "__main__":
    main()
