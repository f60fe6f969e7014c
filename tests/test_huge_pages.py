"""lmblocks.huge_pages: decoding weights back to back in one block of memory, advised as transparent huge pages."""

import mmap
import re
from pathlib import Path

import pytest
import torch

from families import DECODERS
from lmblocks.decoding import Int8Linear, convert_weights
from lmblocks.huge_pages import ALIGNMENT, HUGE_PAGE, block_of, huge_page_block, in_one_block


def _mapping_of(address: int) -> dict[str, str]:
    """The /proc/self/smaps entry of the mapping that holds `address`: its fields (VmFlags, ...) by name."""
    entry = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        header = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
        if header:
            if entry is not None:
                return entry
            entry = {} if int(header[1], 16) <= address < int(header[2], 16) else None
        elif entry is not None:
            name, value = line.split(":", 1)
            entry[name] = value.strip()
    if entry is None:
        raise AssertionError(f"no mapping holds {address:#x}")
    return entry


def test_in_one_block_copies_back_to_back_in_one_huge_page_aligned_block():
    tensors = [torch.randn(3, 5), torch.randint(-127, 128, (64, 7), dtype=torch.int8), torch.tensor(2.5),
               torch.arange(10, dtype=torch.int64).view(2, 5)[:, 1:]]  # a non-contiguous view too
    copies = in_one_block(tensors)
    for tensor, copy in zip(tensors, copies):
        assert torch.equal(tensor, copy) and copy.dtype == tensor.dtype and copy.is_contiguous()
    storages = {copy.untyped_storage().data_ptr() for copy in copies}
    assert len(storages) == 1, "not one block"
    starts = [copy.data_ptr() for copy in copies]
    assert starts == sorted(starts) and all(start % ALIGNMENT == 0 for start in starts)
    assert starts[0] % HUGE_PAGE == 0
    copies[1].add_(1)  # the copies are the block's: writes stay in it, the originals are untouched
    assert not torch.equal(copies[1], tensors[1])


@pytest.mark.skipif(not hasattr(mmap, "MADV_HUGEPAGE") or not Path("/proc/self/smaps").exists()
                    or not Path("/sys/kernel/mm/transparent_hugepage").exists(),
                    reason="transparent huge pages: Linux's, where the kernel has them")
def test_the_block_is_advised_as_huge_pages():
    """The kernel marks a mapping advised with MADV_HUGEPAGE with the "hg" VmFlag, whatever the system's setting."""
    block = huge_page_block(3 * HUGE_PAGE)
    block.fill_(1)
    assert "hg" in _mapping_of(block.data_ptr())["VmFlags"].split()


def test_an_empty_layout_maps_nothing():
    assert block_of([]) == [] and in_one_block([]) == []


def test_in_one_block_refuses_tensors_off_the_cpu():
    with pytest.raises(ValueError, match="CPU tensors"):
        in_one_block([torch.empty(2, device="meta")])


def test_int8_weights_of_a_converted_model_share_one_block():
    family = [f for f in DECODERS if f.name == "llama"][0]
    torch.manual_seed(0)
    model = family.causal_lm_class(family.tiny_config()).eval()
    prompt = torch.randint(3, 99, (1, 6))
    convert_weights(model, "int8")
    layers = [m for m in model.modules() if isinstance(m, Int8Linear) and m.packed]  # in_features % 64 == 0
    assert len(layers) > 2
    assert len({layer.weight_int8.untyped_storage().data_ptr() for layer in layers}) == 1
    starts = [layer.weight_int8.data_ptr() for layer in layers]
    assert starts == sorted(starts), "not in the order of the modules"
    with torch.no_grad():
        logits = model(prompt).logits
        for layer in layers:  # the same weights, each in memory of its own
            layer.weight_int8 = layer.weight_int8.clone()
        assert torch.equal(model(prompt).logits, logits)


def test_packed_float_weights_of_a_packaged_step_share_one_block():
    """The packaged step's linear layers (`PackedLinears`: float32 where lmblocks' packed kernel takes them) hold
    their packed weights back to back in one block, in the order of the modules, the products unchanged."""
    from lmblocks.packaged_step import PackedLinears

    family = [f for f in DECODERS if f.name == "llama"][0]
    torch.manual_seed(0)
    model = family.causal_lm_class(family.tiny_config()).eval()
    packed = PackedLinears(model)
    if not packed.places:
        pytest.skip("lmblocks' packed kernel does not take float32 products on this CPU")
    weights = [layer.weight for _, _, _, layer in packed.places]
    assert len(weights) > 2 and len({w.untyped_storage().data_ptr() for w in weights}) == 1
    starts = [w.data_ptr() for w in weights]
    assert starts == sorted(starts) and all(start % ALIGNMENT == 0 for start in starts)
    x = torch.randn(2, model.config.hidden_size)
    _, _, linear, layer = packed.places[0]
    with torch.no_grad():
        torch.testing.assert_close(layer(x), linear(x), rtol=1e-5, atol=1e-5)


def test_a_kernel_without_huge_pages_gets_ordinary_memory(monkeypatch):
    """A kernel built without transparent huge pages refuses MADV_HUGEPAGE (EINVAL): the block is ordinary memory."""

    class RefusingMapping(mmap.mmap):
        def madvise(self, *args):
            raise OSError(22, "Invalid argument")

    monkeypatch.setattr("lmblocks.huge_pages.mmap.mmap", RefusingMapping)
    block = huge_page_block(HUGE_PAGE + 5)
    block.fill_(1)
    assert block.numel() == HUGE_PAGE + 5 and int(block.sum()) == HUGE_PAGE + 5
