"""Running code where lmblocks is not installed: what a user who downloaded a checkpoint has. A fresh interpreter
(`-I -S`: no user site, no repository on the path) with only the venv's packages, refusing to start if lmblocks can
still be imported, with stdin closed so that a trust-remote-code question fails instead of waiting."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

_PREAMBLE = f"""\
import sys
sys.path.append({sysconfig.get_paths()["purelib"]!r})
try:
    import lmblocks
except ImportError:
    pass
else:
    raise SystemExit("lmblocks must not be importable here")
"""


def run_without_lmblocks(script: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `script` in such an interpreter, with remote code cached under `cwd`; returns the finished process."""
    env = {**os.environ, "HF_MODULES_CACHE": str(cwd / "modules"), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-I", "-S", "-c", _PREAMBLE + script], cwd=cwd, env=env,
                          capture_output=True, stdin=subprocess.DEVNULL, text=True, timeout=timeout)
