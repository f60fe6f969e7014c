"""Compiled decoding (lmblocks.decoding): the same tokens as eager decoding, before and after the weights change."""

import re

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from families import DECODERS
from lmblocks.decoding import compiled_decoding_config, enable_compiled_decoding, frozen_weights, weights_stamp


def test_cpu_config_freezes_and_concatenates_projections():
    """Under `frozen_weights()` three products of one input become one prepacked MKL product, called from the C++
    wrapper (passed as `torch.compile(options=...)` they stay three `aten::mm` on the weights as graph inputs, in
    torch 2.13)."""
    config = compiled_decoding_config("cpu")
    assert config._compile_all_devices and config.fullgraph and config.dynamic is False
    assert compiled_decoding_config("cuda").mode == "reduce-overhead"

    class ThreeProducts(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = (torch.nn.Linear(64, 64, bias=False) for _ in range(3))

        def forward(self, x):
            return self.a(x) + self.b(x) * self.c(x)

    model, x = ThreeProducts().eval(), torch.rand(1, 1, 64)
    with torch.no_grad(), frozen_weights():
        out, code = run_and_get_code(torch.compile(model, **config.to_dict()), x)
    torch.testing.assert_close(out, model(x))
    # Kernel calls in the generated C++ (comments, which name the ATen ops they replace, left out).
    calls = [line for line in "\n".join(code).splitlines() if not line.strip().startswith("//")]
    products = re.findall(r"aoti_torch_cpu_\w+(?=\()|extern_kernels\.\w+", "\n".join(calls))
    assert products == ["aoti_torch_cpu__mkl_linear"], products


@pytest.mark.parametrize("family", DECODERS, ids=lambda f: f.name)
def test_compiled_decoding_matches_eager_and_follows_weight_updates(family):
    torch.manual_seed(0)
    model = family.causal_lm_class(family.tiny_config()).eval()
    prompt = torch.randint(3, 99, (1, 5))
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)

    def both():
        eager = model.generate(prompt, disable_compile=True, cache_implementation="dynamic", **kwargs)
        compiled = model.generate(prompt, **kwargs)
        return eager, compiled

    enable_compiled_decoding(model)
    eager, compiled = both()
    assert model.generation_config.cache_implementation == "static"
    assert hasattr(model, "_compiled_call"), "generate did not compile the decoding step"
    assert torch.equal(compiled, eager)

    # The weights change in place through `.data` (as EMA code and hand-written updates do), which moves neither their
    # address nor their version counter: the compiled graph, which froze copies of them, must not keep the old ones.
    for parameter in model.parameters():
        parameter.data.add_(0.05 * torch.randn_like(parameter))
    eager_after, compiled_after = both()
    assert not torch.equal(eager_after, eager)
    assert torch.equal(compiled_after, eager_after)


def _no_grad_add(model):
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)


def _one_element_through_data(model):
    parameter = list(model.parameters())[-1]
    parameter.data.view(-1)[7] = torch.nextafter(parameter.data.view(-1)[7], torch.tensor(float("inf")))


def _load_state_dict(model):
    state = {key: value.clone() for key, value in model.state_dict().items()}
    state[[name for name, _ in model.named_parameters()][1]] += 1e-3  # not the tied embeddings: lm_head's copy wins
    model.load_state_dict(state)


@pytest.mark.parametrize("change", [_no_grad_add, _one_element_through_data, _load_state_dict, lambda m: m.half()],
                         ids=["no_grad add_", "one element by 1 ulp via .data", "load_state_dict", "half()"])
def test_weights_stamp_sees_every_change(change):
    """The stamp `get_compiled_call` compares before reusing a frozen graph, on every path that changes weights."""
    model = DECODERS[0].causal_lm_class(DECODERS[0].tiny_config())
    stamp = weights_stamp(model)
    assert weights_stamp(model) == stamp  # reading it changes nothing
    change(model)
    assert weights_stamp(model) != stamp


def test_refuses_models_without_static_cache_support():
    from families import BERT

    with pytest.raises(ValueError, match="static-cache"):
        enable_compiled_decoding(BERT.base_class(BERT.tiny_config()))
