"""Carry a Triton cache to another machine: pack it small here, unpack it where it landed.

    python benchmarks/triton_cache_carry.py pack FULL_CACHE CARRIED_CACHE   # on the CPU machine
    python benchmarks/triton_cache_carry.py unpack CARRIED_CACHE            # on the device, before any launch

Triton's cache (TRITON_CACHE_DIR) holds one folder per compiled kernel: its intermediate forms (ttir, ttgir, llir,
ptx), the binary (cubin) and the metadata (json), listed in a group file by ABSOLUTE path; a lookup whose listed
files do not exist is a miss. ``pack`` keeps what a launch loads, the cubin and the metadata (what
TRITON_STORE_BINARY_ONLY=1 would store: a fraction of the size), plus the compiled launcher modules, and lists
the files by bare name, so that nothing is found until ``unpack`` writes the paths of the folder as it is there.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

LOADED = (".cubin", ".json", ".so")  # what a launch reads: binary, metadata, compiled launcher modules


def pack(full: Path, carried: Path) -> None:
    carried.mkdir(parents=True, exist_ok=True)
    for folder in sorted(p for p in full.iterdir() if p.is_dir()):
        kept = [f for f in folder.iterdir() if f.suffix in LOADED and not f.name.startswith("__grp__")]
        if not kept:
            continue
        target = carried / folder.name
        target.mkdir(exist_ok=True)
        for f in kept:
            shutil.copyfile(f, target / f.name)
        for group in folder.glob("__grp__*.json"):
            children = json.loads(group.read_text())["child_paths"]
            names = {name: name for name in children if Path(name).suffix in LOADED}
            (target / group.name).write_text(json.dumps({"child_paths": names}))


def unpack(carried: Path) -> int:
    """Points every group at the files beside it; returns the number of groups."""
    groups = 0
    for group in carried.glob("*/__grp__*.json"):
        children = json.loads(group.read_text())["child_paths"]
        paths = {name: str(group.parent.resolve() / Path(path).name) for name, path in children.items()}
        group.write_text(json.dumps({"child_paths": paths}))
        groups += 1
    return groups


def main(argv: list[str]) -> None:
    if argv[:1] == ["pack"] and len(argv) == 3:
        pack(Path(argv[1]), Path(argv[2]))
    elif argv[:1] == ["unpack"] and len(argv) == 2:
        print(f"{unpack(Path(argv[1]))} compiled kernels in {argv[1]}, paths set for this machine")
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
