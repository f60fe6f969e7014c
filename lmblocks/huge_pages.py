"""Weights that decoding streams, laid out back to back in one block of memory backed by huge pages.

Batch-1 decoding reads every weight once per token, one matrix after another. Allocated one by one, each matrix is
its own mapping of 4 KiB pages: the CPU's prefetchers stop at every page boundary and every 4 KiB costs a TLB entry.
In one block of 2 MiB pages (Linux's transparent huge pages, asked for with `madvise`), the same bytes stream faster.
Measured on an AMD EPYC thread (AVX-512 VNNI), 2026-12-06, lmblocks' int8 kernel over 150 matrices of 1536 × 576
(133 MB, SmolLM2-135M's size): 16 GB/s as separate tensors, 18 GB/s in one block of 4 KiB pages, 22 GB/s in one
block of huge pages; a whole int8 SmolLM2-135M decoding step 14.4–14.9 → 12.6 ms/token (bench/llama_cpp_decode.py).
The float32 and bf16 weights packed for a packaged step (`lmblocks.packaged_step.PackedLinears`) likewise, 2026-12-07:
lmblocks' packed float32 kernel over base LLaMA's 85 products (400 MB), back to back, 24.8 GB/s as separate tensors,
31.1 in one block; SmolLM2-135M's fp32 step 24–26 → 21.4–22.0 ms/token, base LLaMA's 20.3 → 14.8–16.1.

Where huge pages cannot be had (not Linux, a kernel without them, or transparent huge pages set to "never") the
block is ordinary memory, still one stream.
"""

from __future__ import annotations

import mmap

import torch

HUGE_PAGE = 2 << 20  # x86-64's and arm64's transparent huge page size
ALIGNMENT = 64  # each tensor starts on a cache line (and on a 64-byte boundary for aligned vector loads)


def huge_page_block(nbytes: int) -> torch.Tensor:
    """`nbytes` of zeroed uint8 memory, aligned to `HUGE_PAGE`, advised as transparent huge pages where the OS has
    them. Backed by an anonymous mapping that lives as long as the tensor (or a view of it) does."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):  # not Linux: ordinary memory
        return torch.zeros(nbytes, dtype=torch.uint8)
    mapping = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    whole = torch.frombuffer(mapping, dtype=torch.uint8)  # holds `mapping` alive
    start = -whole.data_ptr() % HUGE_PAGE
    try:  # before any page is touched: the kernel then backs the range with huge pages as it faults in
        mapping.madvise(mmap.MADV_HUGEPAGE, start, nbytes)
    except OSError:  # a kernel built without transparent huge pages (EINVAL): ordinary pages, one stream all the same
        pass
    return whole[start:start + nbytes]


def block_of(layout: list[tuple[torch.Size, torch.dtype]]) -> list[torch.Tensor]:
    """Zeroed CPU tensors of these (shape, dtype)s, back to back in that order in one `huge_page_block` (each at a
    multiple of `ALIGNMENT` bytes): give them in the order decoding reads them."""
    if not layout:
        return []
    offsets, end = [], 0
    for shape, dtype in layout:
        offsets.append(end)
        end += -(-torch.Size(shape).numel() * dtype.itemsize // ALIGNMENT) * ALIGNMENT
    block = huge_page_block(end)
    return [block[offset:offset + torch.Size(shape).numel() * dtype.itemsize].view(dtype).view(shape)
            for (shape, dtype), offset in zip(layout, offsets)]


def in_one_block(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of the CPU `tensors`, back to back in that order in one block of huge pages (`block_of`), with their
    shapes and dtypes."""
    for tensor in tensors:
        if tensor.device.type != "cpu":
            raise ValueError(f"in_one_block places CPU tensors; got one on {tensor.device}.")
    return [copy.copy_(tensor) for copy, tensor in zip(block_of([(t.shape, t.dtype) for t in tensors]), tensors)]


__all__ = ["HUGE_PAGE", "block_of", "huge_page_block", "in_one_block"]
