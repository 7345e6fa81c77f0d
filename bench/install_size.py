"""What an install costs on disk: the virtual environment by package group, and wheel files as downloaded.

    python bench/install_size.py [--venv .venv] [--wheels WHEEL ...] [--out bench/results/install.json]

The venv is measured by walking its files (bytes on disk as `du -sb` counts them, hard links once).
Its site-packages are grouped into torch, the NVIDIA CUDA libraries (`nvidia*`, `cuda*` packages),
triton and everything else. Each wheel given with `--wheels` is measured twice: the file as pip
downloads it and the sum of its members' sizes once unpacked.
"""

import argparse
import glob
import json
import os
import platform
import sys
import tempfile
import zipfile

GROUPS = ("torch", "nvidia_cuda", "triton")


def tree_bytes(path: str, seen: set) -> int:
    """Bytes of every regular file under path (or of path itself), each inode counted once."""
    total = 0
    paths = [path] if os.path.isfile(path) else (os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
    for p in paths:
        st = os.lstat(p)
        if not os.path.islink(p) and (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_size
    return total


def group_of(name: str) -> str:
    """The package group of one site-packages entry: a package folder or its `<name>-<version>.dist-info`."""
    low = name.lower()
    if low == "torch" or low.startswith("torch-"):
        return "torch"
    if low.startswith(("nvidia", "cuda")):
        return "nvidia_cuda"
    if low == "triton" or low.startswith("triton-"):
        return "triton"
    return "other"


def venv_sizes(venv: str) -> dict:
    """Bytes of the venv in all, and of its site-packages per package group."""
    site = glob.glob(os.path.join(venv, "lib", "python3*", "site-packages"))
    if not site:
        raise SystemExit(f"install_size: error: no lib/python3*/site-packages under {venv}")
    seen: set = set()
    groups = {g: 0 for g in (*GROUPS, "other")}
    for entry in sorted(os.listdir(site[0])):
        groups[group_of(entry)] += tree_bytes(os.path.join(site[0], entry), seen)
    rest = tree_bytes(venv, seen)  # files outside site-packages (interpreter links, scripts, pip cache)
    return {"total_bytes": sum(groups.values()) + rest, "site_packages_bytes": groups,
            "outside_site_packages_bytes": rest}


def wheel_sizes(path: str) -> dict:
    """A wheel's file size and the sum of its members' uncompressed sizes."""
    with zipfile.ZipFile(path) as z:
        unpacked = sum(i.file_size for i in z.infolist())
    return {"file": os.path.basename(path), "download_bytes": os.path.getsize(path), "unpacked_bytes": unpacked}


def gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def write_json(path: str, data: dict) -> None:
    """Atomic write: a temp file in the same folder, then rename."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def main(argv=None) -> int:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from decm import cli

    p = cli.parser("python bench/install_size.py", __doc__)
    p.add_argument("--venv", default=".venv", help="virtual environment to measure")
    p.add_argument("--wheels", nargs="*", default=[], help="wheel files to measure (download and unpacked size)")
    p.add_argument("--out", default="bench/results/install.json", help="JSON file to write")
    args = p.parse_args(argv)
    missing = [w for w in args.wheels if not os.path.isfile(w)]
    if missing:
        print(f"install_size: error: wheel not found: {missing[0]}", file=sys.stderr)
        return 2
    try:
        import torch
        torch_build = {"version": torch.__version__, "cuda": torch.version.cuda}
    except ImportError:
        torch_build = None
    result = {"venv": args.venv, "sizes": venv_sizes(args.venv), "wheels": [wheel_sizes(w) for w in args.wheels],
              "torch": torch_build, "python": platform.python_version(), "machine": platform.machine()}
    write_json(args.out, result)
    s = result["sizes"]
    print(f"{args.venv}: {gb(s['total_bytes'])}  " + ", ".join(f"{k} {gb(v)}" for k, v in s["site_packages_bytes"].items()))
    for w in result["wheels"]:
        print(f"{w['file']}: {gb(w['download_bytes'])} download, {gb(w['unpacked_bytes'])} unpacked")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
