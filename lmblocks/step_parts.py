"""A packaged decoding step in parts, compiled side by side: one package for the first half of the decoder's layers
(with the embeddings), one for the second (with the final norm and the LM head), each compiled by its own process.

Compiling a package is Python work on one core (tracing, lowering, scheduling and generating the C++ of every
layer: 0.55 s a layer for SmolLM2-135M's int8 step), then the C++ compiler, whose wrapper also grows with the
layers. A machine with two cores or more compiles the two halves at once: the process that needs the step forks
(the copy has the model and everything imported, for nothing) and the copy compiles the first half while this one
compiles the second. SmolLM2-135M int8, two cores, an empty package cache: 24 s in one piece, 17 s in two (see
`lmblocks.packaged_step` for the whole measurement). A token then runs two packages instead of one; the hidden
state is handed from one to the next.

A part is the model's own step with the layers outside its half skipped (`Skipped`): the first part returns the
hidden state that its last layer outputs (what follows is dead code, which export and inductor remove), the second
takes that hidden state in place of its first layer's input (the embeddings before it are dead code too). The
second part reads the cache's length from its own first layer: the first part has already advanced the lengths of
its layers when the second runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import torch

logger = logging.getLogger(__name__)

# A model with fewer decoder layers compiles in one piece: a part's fixed costs (the C++ compiler's headers, inductor's
# set-up) leave nothing to gain below. SmolLM2-135M's shape cut to L layers, int8, two cores, first `generate` in one
# piece / in two: L=8 10.3 / 10.1 s, 12 13.0 / 10.9, 16 14.9 / 12.2, 30 23.7 / 17.0 (2026-12-07).
MIN_LAYERS = 12
GRACE = 60.0  # seconds a forked copy gets, beyond twice this process's own part, before it is stopped


class Part(NamedTuple):
    """Layers [start, stop) of a decoder's `count` (0, 0, 0: the whole step, for a model whose layers are not found)."""

    start: int
    stop: int
    count: int

    @property
    def first(self) -> bool:
        return self.start == 0

    @property
    def last(self) -> bool:
        return self.stop == self.count


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList | None:
    """The model's decoder layers: its ModuleList of `num_hidden_layers` modules (None where there is none)."""
    count = getattr(model.config.get_text_config(decoder=True), "num_hidden_layers", None)
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and count and len(m) == count]
    return lists[0] if len(lists) == 1 else None


def usable_cores() -> int:
    """The cores this process may run on (its affinity, as `taskset` or a container's cpuset limit it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def step_parts(model: torch.nn.Module, places: tuple) -> tuple[Part, ...]:
    """How `model`'s step for a call with tensor inputs `places` is compiled: in two halves where this process may
    use two cores or more and can fork, and the model has `MIN_LAYERS` layers or more and takes token ids; else
    whole."""
    layers = decoder_layers(model)
    if layers is None or ("input_ids", None) not in places:
        return (Part(0, 0, 0),)
    count = len(layers)
    if count < MIN_LAYERS or usable_cores() < 2 or not hasattr(os, "fork"):
        return (Part(0, count, count),)
    return Part(0, count // 2, count), Part(count // 2, count, count)


def part_files(path: Path, parts: tuple[Part, ...]) -> list[Path]:
    """Where each part's package is: the last part at `path` (written last: its file says the step is complete),
    the others beside it."""
    return [path.with_suffix(f".part{i}.pt2") for i in range(len(parts) - 1)] + [path]


class Skipped(torch.nn.Module):
    """A decoder layer outside the part being compiled: its input, unchanged."""

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return args[0] if args else kwargs["hidden_states"]


class Relay:
    """The hidden state handed into a part (`entry`) and out of it (`exit`). Not a container: `torch.export` puts
    copies of a module's lists and dicts back after tracing."""

    entry: torch.Tensor | None = None
    exit: torch.Tensor | None = None


@contextlib.contextmanager
def running_part(model: torch.nn.Module, part: Part, relay: Relay) -> Iterator[None]:
    """`model` running only the layers of `part`: the others skipped, the first one's input taken from
    `relay.entry` (parts after the first), the last one's output put in `relay.exit` (parts before the last)."""
    layers = decoder_layers(model)
    if layers is None or (part.first and part.last):
        yield
        return
    originals = list(layers)

    def enter(module, args, kwargs):
        if args:
            return (relay.entry, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": relay.entry}

    def leave(module, args, output):
        relay.exit = output if torch.is_tensor(output) else output[0]

    hooks = []
    try:
        for i in range(part.count):
            if not part.start <= i < part.stop:
                layers[i] = Skipped()
        if not part.first:
            hooks.append(layers[part.start].register_forward_pre_hook(enter, with_kwargs=True))
        if not part.last:
            hooks.append(layers[part.stop - 1].register_forward_hook(leave))
        yield
    finally:
        for hook in hooks:
            hook.remove()
        for i, layer in enumerate(originals):
            layers[i] = layer


def side_by_side(jobs: list[Callable[[], None]], logs: list[Path]) -> None:
    """Runs `jobs` at once: every job but the last in a forked copy of this process (its output in its `logs`
    entry), the last one here; then waits for the copies. A copy that fails (its log says why) has its job run here
    after. Forking copies the model and everything imported, but only this thread: the copies are made before this
    process starts any thread of its own (`lmblocks.packaged_step.headers_compiled_ahead`), and run on one torch
    thread each (OpenMP's idle threads are not copied, and not needed); a copy stuck nonetheless (on a lock another
    thread held at the fork) is stopped at its deadline (`finished`)."""
    children = []
    for job, log in zip(jobs[:-1], logs):
        with warnings.catch_warnings():  # Python 3.12 warns of forking with threads (OpenMP's, idle): see above
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:  # the copy: never returns into the caller
            status = 1
            try:
                with open(log, "w") as out:
                    os.dup2(out.fileno(), 1)  # the compilers' and inductor's own output too
                    os.dup2(out.fileno(), 2)
                    try:
                        torch.set_num_threads(1)
                        job()
                        status = 0
                    except BaseException:  # noqa: BLE001 - reported in the log; this process runs the job again
                        traceback.print_exc(file=out)
            finally:
                os._exit(status)
        children.append((pid, job, log))
    started, failed = time.monotonic(), []
    try:
        jobs[-1]()
    finally:
        waited = time.monotonic() - started
        for pid, job, log in children:
            why = finished(pid, deadline=time.monotonic() + GRACE + 2 * waited)
            if why is None:
                log.unlink(missing_ok=True)
            else:
                failed.append((job, log, why))
    for job, log, why in failed:
        said = (log.read_text(errors="replace").strip().splitlines() if log.is_file() else []) or [why]
        logger.warning(f"Compiling a part of the decoding step in a forked process failed ({said[-1]}; its log: "
                       f"{log}); compiling it here.")
        job()  # its error, if it fails again, is this process's to raise
        log.unlink(missing_ok=True)


def finished(pid: int, deadline: float) -> str | None:
    """Waits for the forked process `pid`: None once it has exited successfully, else what went wrong. One still
    running at `deadline` (`GRACE` after twice this process's own part: a copy stuck, say, on a lock that another
    thread of this process held when it forked) is killed."""
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return None if status == 0 else f"exit status {status}"
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return "stopped: it did not finish in time"


__all__ = ["Part", "Relay", "Skipped", "decoder_layers", "finished", "part_files", "running_part", "side_by_side",
           "step_parts", "usable_cores"]
