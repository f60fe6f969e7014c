"""lmblocks' CPU decoding attention (lmblocks/cpu_attention.py): the kernel computes PyTorch's attention for every
mask form and grouped-query layout, skips what the mask excludes, and, registered with transformers under its name,
decodes the same tokens as sdpa through transformers' own `generate` and mask utilities."""

import pytest
import torch
import torch.nn.functional as F

from families import DECODERS
from lmblocks import cpu_attention
from lmblocks.cpu_attention import CPU_DECODING_ATTENTION, SHORT_QUERY, cpu_decoding_attention, operator
from lmblocks.decoding import enable_compiled_decoding


def reference(query, key, value, mask, scale):
    """PyTorch's math attention, grouped-query heads expanded, as (B, T, H, D)."""
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.transpose(1, 2)


SHAPES = [(1, 9, 3, 1, 256, 64), (2, 4, 2, 3, 17, 40), (2, 2, 2, 1, 5, 8), (1, 4, 1, 2, 9, 16)]  # B, H, G, T, S, D


@pytest.mark.parametrize("shape", SHAPES)
def test_the_kernel_computes_attention_for_every_mask_form(shape):
    batch, heads, groups, length, positions, head_dim = shape
    torch.manual_seed(0)
    query = torch.randn(batch, heads, length, head_dim).transpose(2, 3).contiguous().transpose(2, 3)  # strided
    key, value = torch.randn(2, batch, groups, positions, head_dim)
    allowed = torch.rand(batch, 1, length, positions) > 0.4
    allowed[..., 0] = True  # every row sees something (a row that sees nothing: below)
    masks = {
        "bool": (allowed, allowed),
        "additive": (torch.where(allowed, 0.0, float("-inf")), allowed),
        "additive, finite": (torch.where(allowed, 0.5, torch.finfo(torch.float32).min), allowed),
        "per head": (allowed.expand(batch, heads, length, positions).clone(), allowed),
        "none": (None, None),
    }
    for name, (mask, reference_mask) in masks.items():
        expected = reference(query, key, value, reference_mask, 0.3)
        if name == "additive, finite":  # the finite bias is added, not only used to mask
            expected = reference(query, key, value, mask, 0.3)
        out = operator().attention(query, key, value, mask, 0.3)
        assert out.shape == (batch, length, heads, head_dim)
        torch.testing.assert_close(out, expected, atol=2e-6, rtol=1e-5, msg=name)
    # bfloat16: summed in float32 from the same bfloat16 values, rounded once at the end
    bf16 = [t.bfloat16() for t in (query, key, value)]
    out = operator().attention(*bf16, allowed, 0.3)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, reference(*[t.float() for t in bf16], allowed, 0.3).bfloat16(), atol=0, rtol=0.008)


def test_masked_positions_are_never_read_and_a_row_that_sees_nothing_is_zero():
    torch.manual_seed(0)
    query, key, value = torch.randn(1, 2, 2, 8), torch.randn(1, 1, 6, 8), torch.randn(1, 1, 6, 8)
    allowed = torch.tensor([[True, True, False, False, False, False], [False] * 6]).view(1, 1, 2, 6)
    expected = reference(query[:, :, :1], key[:, :, :2], value[:, :, :2], None, 0.5)
    key[:, :, 2:], value[:, :, 2:] = float("nan"), float("nan")  # positions not written yet: any bytes
    out = operator().attention(query, key, value, allowed, 0.5)
    torch.testing.assert_close(out[:, :1], expected)
    assert torch.equal(out[:, 1], torch.zeros(1, 2, 8))


def test_bad_inputs_are_refused_with_their_shapes():
    with pytest.raises(RuntimeError, match="shapes do not match"):
        operator().attention(torch.randn(1, 3, 1, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8), None, 1.0)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        operator().attention(*torch.randn(3, 1, 2, 1, 8, dtype=torch.float64), None, 1.0)


class _Module(torch.nn.Module):
    is_causal = True
    num_key_value_groups = 2


def test_long_queries_other_dtypes_and_a_missing_kernel_use_sdpa(monkeypatch):
    torch.manual_seed(0)
    module = _Module().eval()
    key, value = torch.randn(2, 1, 2, SHORT_QUERY + 1, 16)
    causal = torch.ones(SHORT_QUERY + 1, SHORT_QUERY + 1, dtype=torch.bool).tril().view(1, 1, *[SHORT_QUERY + 1] * 2)
    cases = [
        (torch.randn(1, 4, SHORT_QUERY + 1, 16), key, value, causal),  # a prompt: sdpa
        (torch.randn(1, 4, 2, 16), key, value, None),  # several positions, no mask: sdpa's causal path
    ]
    for query, k, v, mask in cases:
        out, weights = cpu_decoding_attention(module, query, k, v, mask, scaling=0.25)
        expected = F.scaled_dot_product_attention(query, k, v, attn_mask=mask, scale=0.25, enable_gqa=True,
                                                  is_causal=mask is None).transpose(1, 2)
        torch.testing.assert_close(out, expected)
    float16 = [t.half() for t in (cases[0][0][:, :, :1], key, value)]
    out, _ = cpu_decoding_attention(module, *float16, None, scaling=0.25)
    torch.testing.assert_close(out, reference(*float16, None, 0.25))
    monkeypatch.setattr(cpu_attention, "_LOADED", [])
    monkeypatch.setattr(cpu_attention, "_FAILED", ["no compiler"])
    query = torch.randn(1, 4, 1, 16)
    out, _ = cpu_decoding_attention(module, query, key, value, None, scaling=0.25)
    torch.testing.assert_close(out, reference(query, key, value, None, 0.25))


@pytest.mark.parametrize("family", DECODERS, ids=lambda f: f.name)
def test_a_model_with_this_attention_decodes_as_with_sdpa(family):
    """Registered with transformers (attention and mask interfaces): a model set to it generates (batched,
    left-padded, static and dynamic cache) the same tokens as with sdpa; `enable_compiled_decoding` picks it for
    float32 on a CPU."""
    torch.manual_seed(0)
    model = family.causal_lm_class(family.tiny_config()).eval()
    prompts = torch.randint(3, 99, (2, 7))
    attention_mask = torch.ones_like(prompts)
    attention_mask[1, :3] = 0  # left padding
    kwargs = dict(attention_mask=attention_mask, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    expected = {cache: model.generate(prompts, cache_implementation=cache, **kwargs) for cache in ("dynamic", "static")}
    model.set_attn_implementation(CPU_DECODING_ATTENTION)
    for cache, tokens in expected.items():
        assert torch.equal(model.generate(prompts, cache_implementation=cache, **kwargs), tokens), cache
    model.set_attn_implementation("sdpa")
    enable_compiled_decoding(model)
    assert model.config._attn_implementation == CPU_DECODING_ATTENTION
