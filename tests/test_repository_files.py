"""What the repository tracks: nothing that only works on the machine it was committed from.

Covered: every tracked symlink (git mode 120000) points at a relative path inside the checkout. A
committed link to a virtual environment elsewhere (``.venv-mlserver -> /tmp/...``) made ``.ci/run``
fail on every clean machine ("File exists" on creating that venv).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_tracked_symlink_stays_inside_the_checkout() -> None:
    listed = subprocess.run(["git", "ls-files", "-s"], cwd=REPO, capture_output=True, text=True, check=True)
    outside = []
    for line in listed.stdout.splitlines():
        mode, _, rest = line.partition(" ")
        if mode != "120000":
            continue
        path = rest.split("\t", 1)[1]
        target = Path((REPO / path).readlink()) if (REPO / path).is_symlink() else None
        if (
            target is None
            or target.is_absolute()
            or not (REPO / path).parent.joinpath(target).resolve().is_relative_to(REPO)
        ):
            outside.append(f"{path} -> {target}")
    assert not outside, outside
