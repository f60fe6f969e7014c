"""A packaged decoding step compiled by another process while this one decodes eagerly
(`enable_compiled_decoding(model, background=True)`).

A package's first compilation takes 17–22 s of two cores for SmolLM2-135M (`lmblocks.packaged_step`), longer than
eager decoding of 200 tokens. But a package holds code, not weights: a process that builds a model of the same
class, config, weight format and attention from random weights, and calls it with a cache and inputs of the same
shapes, compiles the very same package (`package_key` says so: it hashes all of that). So the first `generate` that
needs a package starts a new Python process for it (`BackgroundBuild`) and decodes eagerly meanwhile; the first call
after the package is written loads it (about a second) and decodes compiled from there on (that process compiles in
two parts side by side where the machine has the cores, as this one would: `lmblocks.step_parts`). The process is a
session of its own: it finishes the package even if this one exits or is interrupted (Ctrl-C), for the next run;
another process that needs the same package meanwhile waits for it instead of compiling it twice (`<key>.building`,
which names the compiling process). A model whose class is defined in `__main__`, or whose second copy would not fit
in memory, is compiled here, as without `background` (`rebuildable`); so is one the new process builds differently
(another class of layers, LoRA adapters: its package would have another key) or fails to build, and its log says
why.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

def rebuild_spec(model: torch.nn.Module, places: tuple, fixed: dict, tensors: list[torch.Tensor],
                 max_cache_len: int, path: Path) -> dict:
    """What a new process needs to build `model`'s step for this call and compile its package at `path`: the
    model's class, config, attention and weight format, the cache's length, the call's inputs (shapes, strides and
    dtypes), this process's thread count, and the package's path."""
    from .decoding import WEIGHT_DTYPES, Int8Linear

    int8 = any(isinstance(m, Int8Linear) for m in model.modules())
    formats = {dtype: name for name, dtype in WEIGHT_DTYPES.items() if name != "int8"}  # `convert_weights`' names
    return {"module": type(model).__module__, "class": type(model).__qualname__, "config": model.config.to_dict(),
            "attention": model.config._attn_implementation, "weights": "int8" if int8 else formats.get(model.dtype),
            "max_cache_len": max_cache_len, "places": places, "fixed": fixed, "path": str(path),
            "threads": torch.get_num_threads(),  # lmblocks' kernel libraries are built per thread count
            "inputs": [(list(t.shape), list(t.stride()), str(t.dtype).removeprefix("torch."))
                       for t in tensors[:len(places)]]}


def rebuildable(model: torch.nn.Module) -> bool:
    """Whether a new process can build `model` again for its package: its class importable by name (not defined in
    `__main__`: a script or a notebook), and room in memory for a second copy of its tensors (Linux's MemAvailable:
    the new process holds the model's weights, converted and packed, as this one does)."""
    if type(model).__module__ == "__main__":
        return False
    size = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    try:
        line = next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return False
    return int(line.split()[1]) * 1024 > 2 * size


def build_from_spec(spec_file: str) -> int:
    """In the new process: builds the model `spec_file` describes (random weights), calls it once to lay out its
    static cache, and compiles its step's package; exit status 0 when written at the spec's path, 3 when this model's
    package would have another path (it would not serve the process that asked)."""
    spec = json.loads(Path(spec_file).read_text())
    path = Path(spec["path"])
    try:
        status = _build(spec, path)
    finally:  # this process's files, whether or not the process that asked is still there
        building(path).unlink(missing_ok=True)
        Path(spec_file).unlink(missing_ok=True)
    if status == 0:  # its log (this process's output) is kept only where there is no package, also when the
        path.with_suffix(".log").unlink(missing_ok=True)  # process that asked exited before the build's end
    return status


def _build(spec: dict, path: Path) -> int:
    from transformers import StaticCache

    from .decoding import convert_weights
    from .packaged_step import PackagedStep, PackagedSteps, scattered

    torch.set_num_threads(spec["threads"])  # before any kernel library loads (`lmblocks.cpu_kernels.library_build`)
    model_class = getattr(importlib.import_module(spec["module"]), spec["class"])
    # Random weights: their values do not matter, the package reads the asking process's when it runs.
    model = model_class(model_class.config_class.from_dict(spec["config"])).eval()
    if spec["weights"]:
        convert_weights(model, spec["weights"])
    model.set_attn_implementation(spec["attention"])
    cache = StaticCache(config=model.config, max_cache_len=spec["max_cache_len"])
    with torch.no_grad():
        model(input_ids=torch.zeros(1, 1, dtype=torch.long), past_key_values=cache, use_cache=True)
    places = tuple((name, key) for name, key in spec["places"])
    inputs = [torch.ones(size, dtype=getattr(torch, dtype)).as_strided(size, stride)
              for size, stride, dtype in spec["inputs"]]
    kwargs = {**scattered(places, inputs), "past_key_values": cache}
    steps = PackagedSteps()
    steps.follow(model, stamp="background")
    if PackagedStep.path_for(model, places, spec["fixed"], kwargs, steps) != path:
        print(f"This process would compile another package than {path}: the model it rebuilt differs.", flush=True)
        return 3
    PackagedStep(model, places, spec["fixed"], kwargs, steps, lambda: None, path)
    return 0


_CHILD = """
import importlib, sys
sys.exit(importlib.import_module(sys.argv[1]).build_from_spec(sys.argv[2]))
"""


def building(path: Path) -> Path:
    """The file that says which process compiles the package at `path` (its process id)."""
    return path.with_suffix(".building")


def compiling_elsewhere(path: Path) -> bool:
    """Whether a live process compiles the package at `path` now (`building`)."""
    try:
        pid = int(building(path).read_text())
        os.kill(pid, 0)  # raises if there is no such process
    except (OSError, ValueError):
        return False
    return pid != os.getpid()


class BackgroundBuild:
    """The package at `path` being compiled by a new process (started here: `process`), or by another one that
    started earlier (`compiling_elsewhere`)."""

    def __init__(self, model: torch.nn.Module, places: tuple, fixed: dict, tensors: list[torch.Tensor],
                 max_cache_len: int, path: Path):
        self.path, self.log, self.process = path, path.with_suffix(".log"), None
        if compiling_elsewhere(path):
            logger.info(f"{type(model).__name__}'s decoding step is being compiled by another process into "
                        f"{path}; decoding eagerly until it is written.")
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        spec_file = path.with_suffix(".spec.json")
        spec_file.write_text(json.dumps(rebuild_spec(model, places, fixed, tensors, max_cache_len, path)))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(entry for entry in sys.path if entry)}
        with open(self.log, "w") as log:
            self.process = subprocess.Popen([sys.executable, "-c", _CHILD, __name__, str(spec_file)], env=env,
                                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)  # not stopped by this terminal's Ctrl-C
        building(path).write_text(str(self.process.pid))
        logger.warning(f"Compiling {type(model).__name__}'s decoding step in a background process ({self.process.pid}, "
                       f"log: {self.log}); decoding eagerly until it is ready.")

    @contextlib.contextmanager
    def sharing_cores(self) -> Iterator[None]:
        """One thread fewer for this process's products while the build runs (a core is the build's; it takes two
        while it compiles in parts, `lmblocks.step_parts`): OpenMP's threads wait for each other at every product, and
        one that shares its core with the build stalls them all (SmolLM2-135M int8, two cores, two threads: about 480
        ms a token eagerly beside the build, measured)."""
        threads = torch.get_num_threads()
        torch.set_num_threads(max(1, threads - 1))
        try:
            yield
        finally:
            torch.set_num_threads(threads)

    def running(self) -> bool:
        if self.process is None:
            return compiling_elsewhere(self.path) and not self.path.is_file()
        return self.process.poll() is None

    def succeeded(self) -> bool:
        """Whether the package is written (once `running` is False); its log is kept only where it is not."""
        if self.path.is_file():
            self.log.unlink(missing_ok=True)
            return True
        return False

    def wait(self, timeout: float = 600.0) -> None:
        """Blocks until the build is over (tests; a script that wants compiled speed from its next call)."""
        if self.process is not None:
            self.process.wait(timeout)
            return
        deadline = time.monotonic() + timeout
        while self.running() and time.monotonic() < deadline:
            time.sleep(0.5)


__all__ = ["BackgroundBuild", "build_from_spec", "rebuild_spec", "rebuildable"]
