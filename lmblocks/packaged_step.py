"""The decoding step compiled ahead of time: an AOTInductor package on disk, which a new process loads in about a
second instead of tracing the model again.

torch.compile's on-disk caches keep the compiled code of a step but not the work before it: dynamo traces the model
and AOTAutograd traces it again in every process (its own cache refuses graphs with frozen weights), 15–22 s for
SmolLM2-135M on one CPU thread, longer than eager decoding of 200 tokens. A package made by `torch.export` and
AOTInductor holds the whole step as one C++ library; loading it (`aoti_load_package`) takes no tracing at all.

The package holds code, not weights (`package_constants_in_so` off: a few MB, not the model's size again): the
step's constants — the model's parameters and buffers — are handed to it when it is loaded, the model's own tensors
(`load_constants(user_managed=True)`: no copy). One package serves every model of the same architecture, weight
format and shapes, whatever its weights. Freezing cannot be used (it renames the weights and folds them into new
constants the package would have to hold), nor AOTInductor's runtime constant folding, which would pack the weights
at load (torch 2.13: its proxy executor fails on a custom operator in the folded graph, "Mismatch between tensors
consumed and num of input tensor"). So what freezing did at compile time is done on the model's modules instead:
every linear layer whose product lmblocks' packed kernel takes (`lmblocks.packed_matmul`) is replaced, while the
step is exported, by a `PackedLinear` holding its weight packed once — all of them back to back in one block of huge
pages, in the order the step reads them (`lmblocks.huge_pages`) — and those packed weights are the step's constants
when it runs (`PackagedSteps`: once per model and weights). int8 layers (`Int8Linear`) hold theirs packed
already. Where lmblocks' float kernel does not run (float32 without AVX-512, bf16 without AVX-512 BF16), the
package does ATen's products on the model's own weights, the wide ones (LM head, gate and up projections) on a
contiguous transposed copy (`TransposedLinear`): on AVX2 code paths 3–4 % slower a token than torch.compile's frozen
step (which also concatenates q/k/v and gate/up, and prepacks bf16 weights for oneDNN) but loaded by a new process
in under a second instead of traced again in 14–16 s. So every step on a CPU is packaged (`packaged_products`) but
that of int8 layers outside lmblocks' int8 kernel's layout, which stays torch.compile's.

A package is keyed by everything its code depends on (`package_key`): torch's version, lmblocks' source files, the
CPU kind, the kernels' operator libraries, the model's module tree, config and attention, the shapes and dtypes of the
step's inputs, cache and constants, and the call's settings. It is written under a temporary name and renamed when
complete (another process never loads half a package), in `<inductor cache dir>/lmblocks_packaged_steps`
(`TORCHINDUCTOR_CACHE_DIR`, as torch.compile's caches).

SmolLM2-135M-Instruct, AMD EPYC (AVX-512 BF16), two cores, 2026-12-07 (bench/llama_cpp_decode.py, 16:36 and 17:17,
and by hand): a new process's first compilation into an empty cache takes 17–22 s (int8 17.8–18.2, bf16
17.3–20.0, fp32 16.6–22.4), in two parts side by side (`lmblocks.step_parts`; 23–24 s in one piece, which was
27–33 s before inductor's preparations ran beside the tracing, `headers_compiled_ahead`); of one part's 15 s,
`torch.export` 1.6 s, inductor's tracing, passes, lowering and code generation about 8 s, the C++ compiler 4.5 s
(the wrapper built as `FAST_BUILD`, `without_input_checks` and `wrapper_and_kernels_compiled_together` say); 30–33
s on a machine that never compiled (lmblocks' kernels and inductor's headers built too) — or, with
`background=True`, in other processes while this one decodes (`lmblocks.background_build`); then a new process's
first `generate` in 0.6 s (int8), 1.3 (bf16), 2.0 (fp32, which packs its weights first); decoding (one thread, 17:17)
at 8.2, 12.5 and 23.2 ms/token against llama.cpp's 9.8 (q8_0) and 24.9 (f32) in the same run.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from .background_build import BackgroundBuild, rebuildable
from .cpu_kernels import machine_kind
from .huge_pages import block_of
from .packed_matmul import PackedLinear
from .step_parts import Part, Relay, part_files, running_part, side_by_side, step_parts

logger = logging.getLogger(__name__)

TENSOR_INPUTS = ("input_ids", "position_ids", "attention_mask", "cache_position")  # what a step may take as tensors
SETTINGS = {"use_cache": (True, None), "return_dict": (True, None)}  # call settings a package serves (besides ints)
FIXED_SETTINGS = ("logits_to_keep",)  # integer settings, fixed in the package (part of its key)


def static_cache_tensors(cache: object) -> list[torch.Tensor] | None:
    """A static KV cache's tensors, every layer's keys, values and length so far (transformers' `StaticLayer`,
    initialized), in that order; None for any other cache."""
    layers = getattr(cache, "layers", None)
    if not layers or getattr(cache, "is_compileable", False) is not True:
        return None
    tensors = [[], [], []]
    for layer in layers:
        parts = [getattr(layer, name, None) for name in ("keys", "values", "cumulative_length")]
        if getattr(layer, "is_sliding", True) or not getattr(layer, "is_initialized", False) or not all(
                torch.is_tensor(part) for part in parts):
            return None
        for group, part in zip(tensors, parts):
            group.append(part)
    return [tensor for group in tensors for tensor in group]


def packable_call(args: tuple, kwargs: dict) -> tuple[tuple[tuple[str, str | None], ...], dict] | None:
    """(where the call's tensor inputs are: (name, None) for a tensor, (name, key) for a tensor in a dict of them —
    the attention masks by layer type of models with sliding layers; its fixed settings) when a package can serve
    the call: keyword arguments only, tensors among `TENSOR_INPUTS` on a CPU, a static cache, settings a package
    serves; else None."""
    served = served_call(args, kwargs)
    return None if served is None else served[:2]


def served_call(args: tuple, kwargs: dict) -> tuple[tuple, dict, list[torch.Tensor]] | None:
    """`packable_call`'s answer and the call's cache tensors (`static_cache_tensors`), read once for the token."""
    cache_tensors = None if args else static_cache_tensors(kwargs.get("past_key_values"))
    if cache_tensors is None:
        return None
    places, fixed = [], {}
    for name, value in kwargs.items():
        if name == "past_key_values" or value is None:
            continue
        if name in TENSOR_INPUTS and isinstance(value, dict) and value and all(
                type(key) is str and torch.is_tensor(t) and t.device.type == "cpu" for key, t in value.items()):
            places.extend((name, key) for key in value)
        elif name in TENSOR_INPUTS and torch.is_tensor(value) and value.device.type == "cpu":
            places.append((name, None))
        elif name in SETTINGS and value in SETTINGS[name]:
            continue
        elif name in FIXED_SETTINGS and type(value) is int:
            fixed[name] = value
        else:
            return None
    return tuple(places), fixed, cache_tensors


def gathered(places: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The call's tensor inputs, in `places`' order."""
    return [kwargs[name] if key is None else kwargs[name][key] for name, key in places]


def scattered(places: tuple, tensors: tuple) -> dict:
    """`gathered`'s inverse: the call's keyword arguments from its tensors."""
    kwargs = {}
    for (name, key), tensor in zip(places, tensors):
        if key is None:
            kwargs[name] = tensor
        else:
            kwargs.setdefault(name, {})[key] = tensor
    return kwargs


def packable_linear(module: torch.nn.Module) -> bool:
    """Whether `module` is a linear layer whose product lmblocks' packed kernel takes on this machine."""
    from .decoding import packed_kernel_takes  # decoding imports this module

    return type(module) is torch.nn.Linear and packed_kernel_takes(module.weight)


PACKAGED_DTYPES = (torch.float32, torch.bfloat16)  # float products a package serves: lmblocks' kernel, or ATen's


def packaged_products(model: torch.nn.Module) -> bool:
    """Whether a packaged step can do `model`'s products on this CPU, the condition for one: every linear layer in
    float32 or bfloat16 (lmblocks' packed kernel where it runs, `packable_linear`, ATen's product elsewhere) or int8
    in lmblocks' kernel's layout."""
    from .decoding import Int8Linear

    products = [m for m in model.modules() if type(m) is torch.nn.Linear or isinstance(m, Int8Linear)]
    return bool(products) and all(
        (type(m) is torch.nn.Linear and m.weight.device.type == "cpu" and m.weight.dtype in PACKAGED_DTYPES)
        or (isinstance(m, Int8Linear) and m.packed) for m in products)


class TransposedLinear(torch.nn.Module):
    """A wide float32 linear layer (`wide_linear`: the LM head, an MLP's gate and up projections) whose product ATen
    does, reading a contiguous copy of its weight transposed (the weight's size again), made once: MKL's
    matrix-vector product reads the transposed view a linear layer hands it at about half the speed
    (`lmblocks.decoding.contiguous_wide_weights`, which does the same in torch.compile's step, where q/k/v and
    gate/up are concatenated besides). Shares the layer's bias.

    SmolLM2-135M's fp32 packaged step on AVX2 code paths (`LMBLOCKS_CPU_MARCH=haswell`, one thread, interleaved
    with torch.compile's frozen step in one process, 2026-12-07): 35.5 ms/token with the head, gate and up
    transposed, 44.9 with the head alone, 40.1 with every product; torch.compile's step 34.6."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_t", linear.weight.detach().t().contiguous(), persistent=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        out = torch.mm(flat, self.weight_t) if self.bias is None else torch.addmm(self.bias, flat, self.weight_t)
        return out.reshape(*x.shape[:-1], self.out_features)


def wide_linear(module: torch.nn.Module) -> bool:
    """Whether `module` is a float32 linear layer that ATen multiplies by (not `packable_linear`) and that reads a
    contiguous transposed weight faster (`TransposedLinear`): `WIDE_PRODUCT` times as many outputs as inputs."""
    from .decoding import WIDE_PRODUCT

    return (type(module) is torch.nn.Linear and not packable_linear(module) and module.weight.dtype == torch.float32
            and module.out_features >= WIDE_PRODUCT * module.in_features)


class PackedLinears:
    """`model`'s linear layers packed for lmblocks' kernel (`PackedLinear`), made once for the model's weights of the
    moment; `swapped()` puts them in the model's place (while a step is exported and its constants are gathered)
    and the model's own layers back after."""

    def __init__(self, model: torch.nn.Module):
        linears = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
                   if packable_linear(child)]
        # In one block of huge pages, in the order a step reads them (`lmblocks.huge_pages`): base LLaMA's fp32
        # step, one thread, 20.3 ms/token with each packed weight allocated on its own.
        places = block_of([(linear.weight.shape, linear.weight.dtype) for _, _, linear in linears])
        self.places = [(parent, name, linear, PackedLinear(linear, place))
                       for (parent, name, linear), place in zip(linears, places)]
        self.places += [(parent, name, child, TransposedLinear(child)) for parent in model.modules()
                        for name, child in parent.named_children() if wide_linear(child)]

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        for parent, name, _, packed in self.places:
            setattr(parent, name, packed)
        try:
            yield
        finally:
            for parent, name, linear, _ in self.places:
                setattr(parent, name, linear)


class ExportedStep(torch.nn.Module):
    """The step as `torch.export` takes it: (tensor inputs, cache tensors, the hidden state from the part before, if
    any) -> logits (or, for a part before the last, its hidden state: `lmblocks.step_parts`), the cache updated in
    place. The cache is rebuilt around its tensors on a copy of `cache` (the cache of the call being packaged keeps
    its own)."""

    def __init__(self, model: torch.nn.Module, cache: object, places: tuple, fixed: dict, part: Part | None = None):
        super().__init__()
        self.model, self.cache, self.places, self.fixed = model, cache, places, fixed
        self.part, self.relay = part, Relay()

    def forward(self, inputs: tuple[torch.Tensor, ...], cache_tensors: tuple[torch.Tensor, ...],
                entry: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
        cache = copy.copy(self.cache)
        cache.layers = [copy.copy(layer) for layer in self.cache.layers]
        n = len(cache.layers)
        for i, layer in enumerate(cache.layers):
            layer.keys, layer.values, layer.cumulative_length = cache_tensors[i::n]
        if self.part is not None and not self.part.first:  # the skipped layers' lengths: this part's, not yet advanced
            for layer in cache.layers[:self.part.start]:
                layer.cumulative_length = cache.layers[self.part.start].cumulative_length
        self.relay.entry, self.relay.exit = (entry[0] if entry else None), None
        output = self.model(**scattered(self.places, inputs), past_key_values=cache, use_cache=True, **self.fixed)
        return output.logits if self.part is None or self.part.last else self.relay.exit


def package_key(model: torch.nn.Module, places: tuple, fixed: dict, tensors: list[torch.Tensor],
                constants: dict[str, torch.Tensor], namespaces: list[str], split: tuple[Part, ...]) -> str:
    """The name of the package for this step: a hash of everything its compiled code depends on, the model's module
    tree among them (`repr(model)`: a layer swapped for another without weights, an activation say, is another
    step), and how it is split in parts (`split`: `lmblocks.step_parts`)."""
    digest = hashlib.sha256()
    sources = sorted(Path(__file__).parent.glob("*.py"))  # lmblocks' sources (or a checkpoint's remote code)
    parts = [torch.__version__, machine_kind(), namespaces, model, model.config.to_json_string(),
             model.config._attn_implementation, places, sorted(fixed.items()), split,
             [(tuple(t.shape), t.stride(), t.dtype) for t in tensors],
             sorted((name, tuple(t.shape), t.dtype) for name, t in constants.items())]
    for part in [*(path.read_bytes() for path in sources), *map(repr, parts)]:
        digest.update(part if isinstance(part, bytes) else part.encode())
    return digest.hexdigest()[:24]


def package_folder() -> Path:
    """Where packages are kept: beside torch.compile's caches (`TORCHINDUCTOR_CACHE_DIR`)."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir()) / "lmblocks_packaged_steps"


def vector_isa_trusted() -> contextlib.AbstractContextManager:
    """Inductor's settings that skip its probe of the CPU's vector instruction sets: before its first compilation in
    a cache folder, and before loading a package in every process, inductor builds and loads a test library per
    instruction set (5.5 s the first time, then 0.9 s of subprocesses each time: most of a new process's first
    `generate`, measured). lmblocks' kernels, built for this CPU by the same compiler and loaded — a package is made
    beside every package — proved that already."""
    import torch._inductor.config as config

    return config.patch({"cpp.vec_isa_ok": True})


def load_package(path: Path):
    """The package at `path`, loaded (`aoti_load_package`)."""
    with vector_isa_trusted():
        return torch._inductor.aoti_load_package(str(path))


# AOTInductor's build of a step's C++, made for a first compilation in seconds (SmolLM2-135M's int8 step, one
# thread, measured in one process, 12 interleaved runs): its wrapper (one long function of kernel calls, 16,600
# lines) at -Og without line tables: compiled in 31 s against 40 at inductor's -O1 and 28.5 at -O0, decoding 7.37
# ms/token against 7.46 and 7.74. Inductor's precompiled headers (per machine and compiler flags, 150 MB each, outside
# its cache folder), built beside the tracing (`headers_compiled_ahead`): 3–4 s off every first compilation.
FAST_BUILD = {"aot_inductor.compile_wrapper_opt_level": "Og", "aot_inductor.enable_line_tables": False,
              "aot_inductor.precompile_headers": True}


@contextlib.contextmanager
def without_input_checks() -> Iterator[None]:
    """AOTInductor's C++ wrapper without its checks of the inputs' shapes, strides and dtypes: one function per input
    (6,800 of the 16,600 lines of SmolLM2-135M's wrapper, 94 inputs) and an assert after each extern call, all run only
    when `AOTI_RUNTIME_CHECK_INPUTS` is set. Dead code at every call lmblocks makes (a package is keyed by its
    inputs' shapes, strides and dtypes, `call_key`), which took the compiler 2.6 s of 9.7 (measured, -Og). Where torch
    names these pieces otherwise, nothing changes."""
    import torch._inductor.config as config
    from torch._inductor.codegen.cpp_wrapper_cpu import CppWrapperCpu

    def no_checks(self) -> None:  # the two functions the wrapper's run_impl calls, empty
        self.prefix.splice_aot("""
            static bool _check_aoti_runtime_check_inputs_env() { return false; }
            AOTI_NOINLINE static void __check_inputs_outputs(AtenTensorHandle*, AtenTensorHandle*) {}
        """)

    name = "generate_input_output_runtime_checks"
    original = CppWrapperCpu.__dict__.get(name)
    if original is None:
        yield
        return
    setattr(CppWrapperCpu, name, no_checks)
    try:
        with config.patch({"size_asserts": False}):
            yield
    finally:
        setattr(CppWrapperCpu, name, original)


@contextlib.contextmanager
def wrapper_and_kernels_compiled_together() -> Iterator[None]:
    """AOTInductor compiles a package's C++ wrapper, then its kernels, one after the other (SmolLM2-135M: 7.1 s, then
    2.0); here the wrapper's compiler runs in a thread (its subprocess releases the GIL) while the kernels' runs, on
    another core. Errors are raised where they were. Where torch names its builder otherwise, nothing changes."""
    import threading

    from torch._inductor import cpp_builder

    builder = getattr(cpp_builder, "CppBuilder", None)
    original = getattr(builder, "build", None)
    if original is None:
        yield
        return
    pending: list[tuple[threading.Thread, list[BaseException]]] = []

    def finish() -> None:
        while pending:
            thread, errors = pending.pop()
            thread.join()
            if errors:
                raise errors[0]

    def build(self) -> None:
        if self.get_target_file_path().endswith(".wrapper.o"):
            errors: list[BaseException] = []

            def run() -> None:
                try:
                    original(self)
                except BaseException as error:  # noqa: BLE001 - raised again by `finish`, in the caller's thread
                    errors.append(error)

            thread = threading.Thread(target=run, name="lmblocks-wrapper-build", daemon=True)
            thread.start()
            pending.append((thread, errors))
            return
        try:
            original(self)
        finally:
            finish()

    builder.build = build
    try:
        yield
        finish()
    finally:
        builder.build = original
        for thread, _ in pending:
            thread.join()


@contextlib.contextmanager
def headers_compiled_ahead() -> Iterator[None]:
    """Inductor's preparations for compiling C++ that do not depend on the step, made in a thread while the step is
    traced: its probes of the CPU's vector instruction sets (a test library built and loaded per set, 1.0 s of
    subprocesses in each process) and the precompiled headers of a package's wrapper and kernels (kept per machine
    and compiler flags, outside inductor's cache folder: built once, 4.8 s of one core each; without them the
    wrapper's compiler reads those headers again at every compilation, 3 s of its 7.8 for SmolLM2-135M). The
    thread's subprocesses run on another core than this process's tracing. The thread asks for exactly what
    AOTInductor asks for later (`AotCodeCompiler.compile`), so that call finds both ready (`_precompile_header`'s
    cache); a call that differs, in a later torch, only builds them again there. Any failure here is left to
    inductor's own call to meet and report."""
    import contextvars
    import threading

    def prepare() -> None:
        from torch._inductor import codecache
        from torch._inductor.cpp_builder import CppBuilder, CppTorchDeviceOptions
        from torch._inductor.cpu_vec_isa import pick_vec_isa

        isa = pick_vec_isa()
        # In AotCodeCompiler's order: `_precompile_header`'s cache tells keyword arguments apart by their order too.
        options = dict(aot_mode=True, device_type="cpu", use_mmap_weights=False, use_mmap_weights_external=False,
                       use_relative_path=False, vec_isa=isa)
        command = repr(CppBuilder(name="o", sources="i", BuildOption=CppTorchDeviceOptions(
            vec_isa=isa, device_type="cpu", aot_mode=True)).get_command_line())
        codecache._precompile_header(codecache._get_cpp_wrapper_header("cpu", aot_mode=True), command,
                                     min_optimize=True, **options)
        codecache._precompile_header(codecache._get_cpp_prefix_header("cpu"), command, **options)

    def run() -> None:
        try:
            prepare()
        except Exception as error:  # noqa: BLE001 - inductor's own call builds them, or says what fails
            logger.debug(f"Precompiling inductor's headers ahead failed ({type(error).__name__}: {error}).")

    # In this thread's context: inductor's settings are per thread (context variables), and these patched ones count.
    thread = threading.Thread(target=contextvars.copy_context().run, args=(run,), name="lmblocks-headers",
                              daemon=True)
    thread.start()
    try:
        yield
    finally:
        thread.join()  # before the settings it read are undone


def export_and_package(step: ExportedStep, example: tuple, path: Path) -> None:
    """Exports `step` on `example` and compiles it with AOTInductor into a package at `path`, without the weights,
    written under a temporary name and renamed when complete."""
    import torch._inductor.config as config

    # Every tensor of the model a constant the package reads when it runs: inductor otherwise writes the values of
    # 0-d and small 1-D ones (<= 8 elements: the rotary frequencies of a 16-wide head) into the code, which another
    # model's weights, or these after an update, would not change.
    settings = {"freezing": False, "aot_inductor.package_constants_in_so": False,
                "always_keep_tensor_constants": True, **FAST_BUILD}
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_name(f"{path.stem}.{os.getpid()}.partial.pt2")
    try:
        with (torch.no_grad(), config.patch(settings), vector_isa_trusted(), without_input_checks(),
              wrapper_and_kernels_compiled_together(), headers_compiled_ahead()):
            program = torch.export.export(step, example, strict=False)
            torch._inductor.aoti_compile_and_package(program, package_path=str(staged))
        staged.replace(path)
    finally:
        staged.unlink(missing_ok=True)


def package_parts(model: torch.nn.Module, cache: object, places: tuple, fixed: dict, kwargs: dict,
                  parts: tuple[Part, ...], paths: list[Path]) -> None:
    """Compiles the packages of the step's `parts` at `paths`, side by side (`lmblocks.step_parts`); the last one,
    whose file says the step is complete, is put in place after the others."""
    tensors = step_tensors(places, kwargs)
    inputs = (tuple(tensors[:len(places)]), tuple(tensors[len(places):]))
    with torch.no_grad():
        hidden = (model.get_input_embeddings()(kwargs["input_ids"]),) if len(parts) > 1 else ()

    def job(part: Part, path: Path) -> Callable[[], None]:
        def compile_part() -> None:
            step = ExportedStep(model, cache, places, fixed, part)
            with running_part(model, part, step.relay):
                export_and_package(step, inputs if part.first else (*inputs, hidden), path)
        return compile_part

    last = paths[-1].with_name(f"{paths[-1].stem}.{os.getpid()}.last.pt2")
    last.parent.mkdir(parents=True, exist_ok=True)
    try:
        side_by_side([job(part, path) for part, path in zip(parts, [*paths[:-1], last])],
                     [path.with_suffix(".log") for path in paths[:-1]])
        last.replace(paths[-1])
    finally:
        last.unlink(missing_ok=True)


class PackagedStep:
    """One model's decoding step for one call signature, loaded from its packages (compiled first if there are none:
    in parts, `lmblocks.step_parts`), given the model's tensors and packed weights (`steps`: shared by the model's
    steps) as their constants."""

    def __init__(self, model: torch.nn.Module, places: tuple, fixed: dict, kwargs: dict, steps: PackagedSteps,
                 on_compile: Callable[[], None], path: Path | None = None):
        self.stamp = None
        parts = step_parts(model, places)
        self.path = path or self.path_for(model, places, fixed, kwargs, steps)  # `path`: the caller's `path_for`
        self.paths = part_files(self.path, parts)
        self.runners = None
        if self.path.is_file():
            logger.info(f"Loading {type(model).__name__}'s decoding step from {self.path} (compiled before).")
            try:
                self.runners = [load_package(path) for path in self.paths]
            except Exception as error:  # noqa: BLE001 - a damaged package (its writes are staged: not by lmblocks)
                logger.warning(f"The package {self.path} could not be loaded ({type(error).__name__}: {error}); "
                               "compiling the step again in its place.")
        if self.runners is None:
            logger.info(f"Compiling {type(model).__name__}'s decoding step ahead of time into {self.path}"
                        + (f" in {len(parts)} parts, side by side." if len(parts) > 1 else "."))
            with steps.packed.swapped():
                package_parts(model, kwargs["past_key_values"], places, fixed, kwargs, parts, self.paths)
            on_compile()
            self.runners = [load_package(path) for path in self.paths]
        self.refresh(steps)

    @staticmethod
    def path_for(model: torch.nn.Module, places: tuple, fixed: dict, kwargs: dict, steps: PackagedSteps) -> Path:
        """Where the package of `model`'s step for this call is (or will be: its last part's)."""
        key = package_key(model, places, fixed, step_tensors(places, kwargs), steps.constants, steps.namespaces(model),
                          step_parts(model, places))
        return package_folder() / f"{key}.pt2"

    def refresh(self, steps: PackagedSteps) -> None:
        """Hands the step the model's tensors of `steps.stamp` (the weights changed since it was loaded: packed
        again there), read in place."""
        if self.stamp != steps.stamp:
            self.held = []  # kept alive here
            for runner in self.runners:
                self.held.append({name: steps.constants[name] for name in runner.get_constant_fqns()})
                runner.load_constants(self.held[-1], check_full_update=True, user_managed=True)
            self.stamp = steps.stamp

    def __call__(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """The logits, for the call's tensors (`step_tensors`): each part's output handed to the next."""
        hidden = []
        for runner in self.runners:
            hidden = runner.loader.boxed_run([*tensors, *hidden])[:1]
        return hidden[0]


def step_tensors(places: tuple, kwargs: dict) -> list[torch.Tensor]:
    """What a packaged step takes, in its order: the call's tensor inputs, then its cache's tensors."""
    return gathered(places, kwargs) + static_cache_tensors(kwargs["past_key_values"])


def call_key(places: tuple, fixed: dict, tensors: list[torch.Tensor]) -> tuple:
    """What tells apart the packages a model needs: its call's inputs' and cache's shapes, strides and dtypes
    (`tensors`: `step_tensors`), its settings."""
    return places, tuple(sorted(fixed.items())), tuple((t.shape, t.stride(), t.dtype) for t in tensors)


class PackagedSteps(dict):
    """A model's packaged steps by call signature (`call_key`), and what they share: the model's linear layers packed
    (`PackedLinears`) and the tensors the steps take as constants, for the weights of `stamp` (`weights_stamp`).

    Its own type, not a dict: `torch.export` puts back copies of a module's plain containers after tracing (undoing
    assignments made while tracing), and a step made while the first one was exported would be lost."""

    told = False  # whether a call that no package serves was reported (once per model)
    stamp = packed = constants = None

    def follow(self, model: torch.nn.Module, stamp: object) -> None:
        """Packs `model`'s weights again and gathers its tensors when they changed since the last `stamp`."""
        if stamp != self.stamp:
            self.packed = None  # the old packed weights freed before the new ones are made
            self.packed = PackedLinears(model)
            with self.packed.swapped():
                step = ExportedStep(model, None, (), {})  # the names the exported step gives the model's tensors
                tensors = {**dict(step.named_parameters(remove_duplicate=False)),
                           **dict(step.named_buffers(remove_duplicate=False))}
            self.constants = {name: tensor.detach() for name, tensor in tensors.items()}
            self.stamp = stamp

    def namespaces(self, model: torch.nn.Module) -> list[str]:
        """The lmblocks operator libraries `model`'s step calls (their names change with their source and build):
        only those, not every one loaded in the process, which another process may not have loaded."""
        from . import cpu_attention, int8_matmul, packed_matmul
        from .decoding import Int8Linear

        packed = any(isinstance(layer, PackedLinear) for *_, layer in self.packed.places)
        used = [packed_matmul._LOADED.get("native") if packed else None,
                int8_matmul._LOADED.get("native") if any(isinstance(m, Int8Linear) for m in model.modules()) else None,
                cpu_attention._LOADED[0] if model.config._attn_implementation == cpu_attention.CPU_DECODING_ATTENTION
                and cpu_attention._LOADED else None]
        return [name for name in used if name]


def new_step(model: torch.nn.Module, places: tuple, fixed: dict, kwargs: dict, steps: PackagedSteps,
             on_compile: Callable[[], None], background: bool) -> PackagedStep | BackgroundBuild:
    """The step for a call no step of `model` served yet: its package loaded, or compiled here, or (`background`,
    where there is no package yet) compiled by another process (`lmblocks.background_build`)."""
    if not (background and rebuildable(model)):
        return PackagedStep(model, places, fixed, kwargs, steps, on_compile)
    path = PackagedStep.path_for(model, places, fixed, kwargs, steps)
    if not path.is_file():
        try:
            return BackgroundBuild(model, places, fixed, step_tensors(places, kwargs),
                                   kwargs["past_key_values"].get_max_length(0), path)
        except Exception as error:  # noqa: BLE001 - e.g. a config that JSON cannot hold: compiled here instead
            logger.warning(f"{type(model).__name__}'s decoding step cannot be compiled in the background "
                           f"({type(error).__name__}: {error}); compiling it here.")
    return PackagedStep(model, places, fixed, kwargs, steps, on_compile, path)


def finished_build(build: BackgroundBuild, model: torch.nn.Module, places: tuple, fixed: dict, kwargs: dict,
                   steps: PackagedSteps, on_compile: Callable[[], None]) -> PackagedStep:
    """The step once its background build is over: its package loaded, or, where the build wrote none (its log
    says why), compiled here."""
    if build.succeeded():
        on_compile()  # compiled, if not in this process
    else:
        logger.warning(f"The background compilation of {type(model).__name__}'s decoding step wrote no package "
                       f"(see {build.log}); compiling it here.")
    return PackagedStep(model, places, fixed, kwargs, steps, on_compile, build.path)


def packaged_call(model: torch.nn.Module, backend: dict, stamp: object, fallback: Callable) -> Callable:
    """`model`'s decoding step for one generation: each call that a package can serve (`packable_call`) runs the
    model's packaged step for its signature (made or loaded on first use, its weights refreshed to `stamp`); any
    other call runs `fallback` (torch.compile's step). `backend` (the compile config's) counts compilations and steps
    as for torch.compile's step. A step that cannot be packaged (export or compilation failed) says why, once, and
    falls back."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    steps = model.__dict__.setdefault("_packaged_steps", PackagedSteps())

    def compiling() -> None:
        backend.compilations += 1

    def call(*args, **kwargs):
        served = served_call(args, kwargs)
        if served is None:
            if not steps.told:
                steps.told = True
                arguments = ", ".join(f"{name}={type(value).__name__}" for name, value in kwargs.items())
                logger.warning(f"A decoding step of {type(model).__name__} that a package cannot serve (arguments: "
                               f"{len(args)} positional, {arguments}) runs torch.compile's step.")
            return fallback(*args, **kwargs)
        places, fixed, cache_tensors = served
        tensors = gathered(places, kwargs) + cache_tensors  # read once per token: the key, then the step
        key = call_key(places, fixed, tensors)
        steps.follow(model, stamp)
        def made(make: Callable[[], PackagedStep | BackgroundBuild]) -> PackagedStep | BackgroundBuild | None:
            try:
                return make()
            except Exception as error:  # noqa: BLE001 - any export or build failure: torch.compile's step instead
                logger.warning(f"{type(model).__name__}'s decoding step could not be compiled ahead of time "
                               f"({type(error).__name__}: {error}); torch.compile's step runs instead.")
                return None

        if key not in steps:
            steps[key] = made(lambda: new_step(model, places, fixed, kwargs, steps, compiling,
                                               backend.get("background")))
        step = steps[key]
        if isinstance(step, BackgroundBuild):
            if step.running():
                with step.sharing_cores():
                    return model(*args, **kwargs)  # eagerly, until the package is written
            step = steps[key] = made(lambda: finished_build(step, model, places, fixed, kwargs, steps, compiling))
        if step is None:
            return fallback(*args, **kwargs)
        step.refresh(steps)
        backend.steps += 1
        return CausalLMOutputWithPast(logits=step(tensors), past_key_values=kwargs["past_key_values"])

    return call


__all__ = ["PackagedStep", "PackagedSteps", "call_key", "package_folder", "package_key", "packable_call",
           "packaged_call", "packaged_products", "static_cache_tensors", "step_tensors"]
