"""lmblocks' C++ operators for CPU decoding, built for the machine they run on.

Each operator library is one C++ source (`lmblocks.int8_matmul`, `lmblocks.packed_matmul`, `lmblocks.cpu_attention`),
compiled on first use (about 6 s of one core each, most of it torch's headers; `build_libraries` builds several at
once) with `-march=native`, once per source, machine kind and torch version, in torch's extension folder
(`TORCH_EXTENSIONS_DIR`, by default ~/.cache/torch_extensions); a new process loads the built library in 0.1 s.
Its operators live in a namespace named after that build (`torch.ops.<namespace>`): a build for another source or
machine never shadows this one. `torch.compile` keeps such an operator as one node, and the compiled step's C++
wrapper calls it through the dispatcher, without Python.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
from collections.abc import Callable
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


# Builds lmblocks' kernels for another, older CPU than this one (a gcc `-march=` name, e.g. "haswell": AVX2 without
# AVX-512) and takes only that CPU's vector features from this one's: to measure, on one machine, the code paths
# another kind of machine takes (with ATEN_CPU_CAPABILITY=avx2 for torch's own kernels and inductor's; the memory
# system stays this machine's). Unset: "native".
TARGET_MARCH_VARIABLE = "LMBLOCKS_CPU_MARCH"


def target_march() -> str:
    """The `-march=` lmblocks' kernels are built for: "native", or `LMBLOCKS_CPU_MARCH`'s CPU."""
    return os.environ.get(TARGET_MARCH_VARIABLE, "").strip() or "native"


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as /proc/cpuinfo lists them (Linux; empty elsewhere); with `LMBLOCKS_CPU_MARCH` set,
    without the vector extensions (AVX, AMX) that CPU lacks."""
    try:
        line = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return frozenset()
    flags = frozenset(line.split(":", 1)[1].split())
    march = target_march()
    if march == "native":
        return flags
    enabled = compiler_features(march)
    return frozenset(flag for flag in flags
                     if not flag.startswith(("avx", "amx")) or flag.replace("_", "") in enabled)


def compiler() -> str:
    """The C++ compiler that builds lmblocks' kernels: `CXX`, else c++."""
    return os.environ.get("CXX", "c++")


def compiler_features(march: str) -> frozenset[str]:
    """The instruction-set macros gcc defines for `-march=march`, as /proc/cpuinfo spells flags without their
    underscores: `__AVX512BF16__` → "avx512bf16"."""
    import subprocess

    try:
        macros = subprocess.run([compiler(), f"-march={march}", "-dM", "-E", "-x", "c++", os.devnull], check=True,
                                capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        raise ValueError(f"{TARGET_MARCH_VARIABLE}={march!r}: the C++ compiler does not know this -march ({error})")
    return frozenset(name.strip("_").lower().replace("_", "") for line in macros.splitlines()
                     if line.startswith("#define __") and (name := line.split()[1]).endswith("__"))


def machine_kind() -> str:
    """The CPU features the compiler targets with `-march=native` (a build is only valid on a machine of its kind)."""
    flags = " ".join(sorted(cpu_flags())) or platform.processor() or platform.machine()
    return hashlib.sha256(flags.encode()).hexdigest()[:10]


def library_build(stem: str, source: str, march: str = "native",
                  defines: dict[str, object] | None = None) -> tuple[str, Path, list[str]]:
    """Where the operator library `source` for `-march=march` with the macros `defines` lives, and how it is built:
    (its namespace, its file, the compiler's command without the output file).

    Built with OpenMP when torch runs on several threads at the time (`torch.get_num_threads()`), without it on one:
    ATen's `parallel_for` is inline OpenMP code and runs on one thread in a library built without `-fopenmp`, but
    built with it the same kernels streamed 10–15 % slower on one thread (SmolLM2's bf16 products, 17.5 against
    20.7 GB/s, interleaved, one AMD EPYC thread, 2026-12-07; why is not known). Two threads then stream SmolLM2's
    int8 products at 18–20 GB/s against 15–17 on one (bench/results/llama-cpp-decode-2-threads.md: whole steps)."""
    from torch.utils.cpp_extension import include_paths, library_paths

    defines = dict(defines or {})
    if march == "native":
        march = target_march()
    machine = machine_kind() if march == "native" else ""
    parallel = torch.get_num_threads() > 1
    kind = f"{march}, {sorted(defines.items())}, {machine}, torch {torch.__version__}, parallel {parallel}"
    name = f"lmblocks_{stem}_{hashlib.sha256(f'{source}{kind}'.encode()).hexdigest()[:12]}"
    folder = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions") / name
    openmp = ["-fopenmp"] if parallel else []
    command = [compiler(), "-x", "c++", str(folder / f"{stem}.cpp"), "-shared", "-fPIC",
               "-std=c++20", "-O3", f"-march={march}", *openmp,
               f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", f"-DLMBLOCKS_NAMESPACE={name}",
               *(f"-D{key}={value}" for key, value in defines.items()),
               *(f"-isystem{path}" for path in include_paths()), *(f"-L{path}" for path in library_paths()),
               "-lc10", "-ltorch_cpu"]
    return name, folder / f"{name}.so", command


def start_build(stem: str, source: str, command: list[str], library: Path) -> Callable[[], None]:
    """Starts the compiler on `source` (written beside `library` first) into a staged file; the returned function
    waits for it and moves the library into place, whole (two processes building one library both succeed), or
    raises with the compiler's messages."""
    import subprocess

    logger.info(f"Building lmblocks' {stem} kernels ({library.stem}) in {library.parent}.")
    library.parent.mkdir(parents=True, exist_ok=True)
    source_file = library.parent / f"{stem}.cpp"
    if not source_file.is_file() or source_file.read_text() != source:
        staged_source = source_file.with_name(f"{source_file.name}.{os.getpid()}")
        staged_source.write_text(source)
        staged_source.replace(source_file)
    staged = library.with_name(f"{library.name}.{os.getpid()}.partial")
    compiler = subprocess.Popen([*command, "-o", str(staged)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)

    def finish() -> None:
        messages = compiler.communicate()[0]
        if compiler.returncode != 0:
            staged.unlink(missing_ok=True)
            raise RuntimeError(f"building {library.name} failed ({' '.join(command)}):\n{messages[-4000:]}")
        staged.replace(library)

    return finish


def build_libraries(libraries: list[tuple[str, str, str, dict[str, object]]]) -> None:
    """Builds those of `libraries` ((stem, source, march, defines), as `load_operators` takes them) not built yet,
    all at once: one compiler process each (about 6 s of one core apiece, most of it torch's headers), so a first
    use on two cores waits for the slowest, not for their sum. A build that fails is left for `load_operators` to
    report."""
    waiting = []
    for stem, source, march, defines in libraries:
        _, library, command = library_build(stem, source, march, defines)
        if not library.is_file():
            try:
                waiting.append(start_build(stem, source, command, library))
            except OSError:  # no compiler: `load_operators` reports it
                break
    for finish in waiting:
        try:
            finish()
        except RuntimeError:
            pass


def load_operators(stem: str, source: str, march: str = "native", defines: dict[str, object] | None = None) -> str:
    """Builds (or loads, when built before) the operator library `source` for `-march=march` with the macros
    `defines` (`library_build`), and returns its namespace (`torch.ops.<namespace>`). The source declares its
    operators with `TORCH_LIBRARY(LMBLOCKS_NAMESPACE, m)`. Callers keep the namespace: loading a library twice
    fails."""
    name, library, command = library_build(stem, source, march, defines)
    try:  # built before, for this source, machine kind and torch: no compiler
        torch.ops.load_library(str(library))
    except OSError:  # not built yet
        start_build(stem, source, command, library)()
        torch.ops.load_library(str(library))
    return name


def builds(load: Callable[[], object], what: str, instead: str) -> bool:
    """Whether `load()` (an operator library's loader) succeeds; the build needs a C++ compiler. When it fails, a
    warning names `what` could not be built, why, and what runs `instead`: decoding must go on, the slower way."""
    try:
        load()
    except Exception as error:  # noqa: BLE001 - any build failure: the caller falls back
        logger.warning(f"lmblocks' {what} could not be built ({type(error).__name__}: {error}); {instead}")
        return False
    return True


__all__ = ["TARGET_MARCH_VARIABLE", "build_libraries", "builds", "compiler", "compiler_features", "cpu_flags",
           "library_build", "load_operators", "machine_kind", "target_march"]
