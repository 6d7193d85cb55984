"""Copy the wheels of SRC to DST, dropping from the one named PREFIX-* the files under the paths DROP (and those
paths from its RECORD and top_level.txt), so the device carries what runs and not what never loads.

    python trim_wheels.py SRC DST PREFIX DROP[,DROP...] [KEEP_SUFFIX,...]

A DROP path ending in "*" drops the files it starts, except those ending in one of KEEP_SUFFIX (bitsandbytes: its
per-CUDA libraries, all but CUDA 13.0's and the CPU one).
"""

import pathlib
import shutil
import sys
import zipfile


def main(src: str, dst: str, prefix: str, drop: str, keep_suffix: str = "") -> None:
    drops, keeps = drop.split(","), tuple(k for k in keep_suffix.split(",") if k)

    def keep(name: str) -> bool:
        for d in drops:
            if d.endswith("*") and name.startswith(d[:-1]) and not name.endswith(keeps or ("\0",)):
                return False
            if not d.endswith("*") and name.startswith(d):
                return False
        return True

    out_dir = pathlib.Path(dst)
    for whl in sorted(pathlib.Path(src).glob("*.whl")):
        out = out_dir / whl.name
        if not whl.name.startswith(prefix + "-"):
            shutil.copy(whl, out)
            continue
        tops = {d.rstrip("/*").split("/")[0] for d in drops if d.endswith("/")}
        with zipfile.ZipFile(whl) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zout:
            for info in zin.infolist():
                if not keep(info.filename):
                    continue
                data = zin.read(info.filename)
                if info.filename.endswith(".dist-info/RECORD"):
                    data = ("\n".join(r for r in data.decode().splitlines() if keep(r.split(",")[0])) + "\n").encode()
                elif info.filename.endswith(".dist-info/top_level.txt"):
                    data = ("\n".join(t for t in data.decode().splitlines() if t not in tops) + "\n").encode()
                zout.writestr(info, data)
    print("\n".join(f"{p.name}: {p.stat().st_size / 2**20:.1f} MiB" for p in sorted(out_dir.glob("*.whl"))))


if __name__ == "__main__":
    main(*sys.argv[1:])
