"""`--help` in a fraction of a second: each script prints the help text it printed before, without importing lmblocks.

Building a script's help needs its argument classes, and through them torch (`TrainingArguments`, and `import
lmblocks`, which registers every model class with transformers): seconds of imports for a page of text. So the
first `--help` builds the text as usual and lmblocks' parser (`lmblocks.cli`) keeps it; later ones print the kept
copy. The copy is keyed on everything the text depends on: the script, lmblocks' code, the versions of transformers
and TRL, Python, and the terminal's width. Only the standard library is imported here.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

HELP_FLAGS = ("-h", "--help")
PACKAGE = Path(__file__).resolve().parent.parent / "lmblocks"


def cache_path(script: str) -> Path:
    from importlib import metadata

    key = hashlib.sha256()
    for path in [Path(script).resolve(), *sorted(PACKAGE.glob("*.py"))]:
        stat = path.stat()
        key.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    for distribution in ("transformers", "trl", "peft"):
        try:
            key.update(f"{distribution}={metadata.version(distribution)}\n".encode())
        except metadata.PackageNotFoundError:
            key.update(f"{distribution}=none\n".encode())
    key.update(f"{sys.version}:{shutil.get_terminal_size().columns}:{os.environ.get('COLUMNS', '')}".encode())
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lmblocks" / "help"
    return root / f"{Path(script).stem}-{key.hexdigest()[:16]}.txt"


def print_cached_help(script: str, argv: list[str] | None = None) -> None:
    """With -h/--help on the command line: print the kept help of `script` and exit, or, when there is none yet,
    tell lmblocks' parser where to keep the one it is about to print."""
    argv = sys.argv[1:] if argv is None else argv
    if not any(arg in HELP_FLAGS for arg in argv) or "--" in argv:
        return
    try:
        path = cache_path(script)
    except OSError:
        return
    if path.is_file():
        sys.stdout.write(path.read_text())
        sys.exit(0)
    os.environ["LMBLOCKS_HELP_CACHE"] = str(path)
