"""`generate()` through transformers' GenerationMixin, for every decoder family in tests/families.py.

The generation suite of transformers (`GenerationTesterMixin`) is not in the sdist; these tests cover the behaviours
the issue names: cache vs no cache, left padding, greedy / sampling / beam search, StaticCache and its compiled
decoding step, inputs_embeds, continuing from a returned cache, and the `return_dict_in_generate` outputs.
"""

from __future__ import annotations

import pytest
import torch
from transformers import CompileConfig, DynamicCache, StaticCache

from families import DECODERS, Family

PROMPT_LEN, NEW_TOKENS = 6, 8


@pytest.fixture(params=DECODERS, ids=lambda family: family.name)
def family(request) -> Family:
    return request.param


def _model(family: Family, **config_overrides):
    torch.manual_seed(0)
    return family.causal_lm_class(family.tiny_config(**config_overrides)).eval()


def _prompts(family: Family, batch_size: int = 2, length: int = PROMPT_LEN) -> torch.Tensor:
    # Ids from 3 up: clear of the special tokens (pad/bos/eos) of every family's tiny config.
    vocab_size = family.tiny_config().vocab_size
    return torch.randint(3, vocab_size - 2, (batch_size, length), generator=torch.Generator().manual_seed(2))


def _greedy(model, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
    settings = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                    pad_token_id=model.config.pad_token_id)
    return model.generate(input_ids, **{**settings, **kwargs})


def test_cache_matches_no_cache(family):
    model = _model(family)
    prompts = _prompts(family)
    with_cache = _greedy(model, prompts, use_cache=True, output_scores=True, return_dict_in_generate=True)
    without_cache = _greedy(model, prompts, use_cache=False, output_scores=True, return_dict_in_generate=True)
    assert torch.equal(with_cache.sequences, without_cache.sequences)
    for cached, recomputed in zip(with_cache.scores, without_cache.scores):
        torch.testing.assert_close(cached, recomputed, atol=1e-5, rtol=1e-4)


def test_incremental_forward_matches_full_forward(family):
    model = _model(family)
    ids = _prompts(family, length=10)
    with torch.no_grad():
        full = model(ids).logits
        cache = DynamicCache(config=model.config)
        first = model(ids[:, :7], past_key_values=cache, use_cache=True)
        rest = model(ids[:, 7:], past_key_values=first.past_key_values, use_cache=True)
    assert rest.past_key_values.get_seq_length() == 10
    torch.testing.assert_close(torch.cat([first.logits, rest.logits], dim=1), full, atol=1e-5, rtol=1e-4)


def test_left_padding_matches_unpadded(family):
    model = _model(family)
    pad = model.config.pad_token_id
    long, short = _prompts(family, batch_size=1, length=PROMPT_LEN), _prompts(family, batch_size=1, length=3)
    batch = torch.cat([long, torch.cat([torch.full((1, PROMPT_LEN - 3), pad), short], dim=1)])
    attention_mask = (torch.arange(PROMPT_LEN) >= torch.tensor([[0], [PROMPT_LEN - 3]])).long()

    padded = _greedy(model, batch, attention_mask=attention_mask, output_scores=True, return_dict_in_generate=True)
    alone_long = _greedy(model, long, output_scores=True, return_dict_in_generate=True)
    alone_short = _greedy(model, short, output_scores=True, return_dict_in_generate=True)
    assert torch.equal(padded.sequences[0, PROMPT_LEN:], alone_long.sequences[0, PROMPT_LEN:])
    assert torch.equal(padded.sequences[1, PROMPT_LEN:], alone_short.sequences[0, 3:])
    for step, (batched, single) in enumerate(zip(padded.scores, alone_short.scores)):
        torch.testing.assert_close(batched[1], single[0], atol=1e-4, rtol=1e-4, msg=f"step {step}")


def test_greedy_picks_the_argmax(family):
    model = _model(family)
    out = _greedy(model, _prompts(family), output_logits=True, return_dict_in_generate=True)
    new_tokens = out.sequences[:, PROMPT_LEN:]
    assert torch.equal(torch.stack(out.logits, dim=1).argmax(-1), new_tokens)


def test_sampling(family):
    model = _model(family)
    prompts = _prompts(family)
    sample = dict(do_sample=True, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=0)
    torch.manual_seed(3)
    first = model.generate(prompts, **sample, top_k=20, temperature=0.8)
    torch.manual_seed(3)
    again = model.generate(prompts, **sample, top_k=20, temperature=0.8)
    assert torch.equal(first, again)  # reproducible under a seed
    assert first.shape == (2, PROMPT_LEN + NEW_TOKENS) and torch.equal(first[:, :PROMPT_LEN], prompts)
    # top_k=1 leaves one candidate: sampling must then reproduce greedy decoding.
    assert torch.equal(model.generate(prompts, **sample, top_k=1), _greedy(model, prompts))


def test_beam_search(family):
    model = _model(family)
    prompts = _prompts(family)
    out = model.generate(prompts, num_beams=3, num_return_sequences=3, max_new_tokens=NEW_TOKENS,
                         min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, output_scores=True,
                         return_dict_in_generate=True, early_stopping=True)
    assert out.sequences.shape == (6, PROMPT_LEN + NEW_TOKENS)
    scores = out.sequences_scores.view(2, 3)
    assert torch.all(scores[:, :-1] >= scores[:, 1:]), "beams come back best first"
    # Each beam's score is its log-probability per generated token, recomputed here by one forward pass without cache:
    # this holds only if the cache was reordered correctly whenever beams swapped.
    with torch.no_grad():
        logprobs = model(out.sequences).logits[:, PROMPT_LEN - 1 : -1].log_softmax(-1)
    new_tokens = out.sequences[:, PROMPT_LEN:]
    recomputed = logprobs.gather(-1, new_tokens[..., None]).squeeze(-1).sum(-1) / NEW_TOKENS
    torch.testing.assert_close(out.sequences_scores, recomputed, atol=1e-4, rtol=1e-4)
    # One beam is greedy decoding.
    assert torch.equal(model.generate(prompts, num_beams=1, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                      do_sample=False, pad_token_id=0), _greedy(model, prompts))


def test_static_cache(family):
    model = _model(family)
    prompts = _prompts(family)
    static = _greedy(model, prompts, cache_implementation="static", return_dict_in_generate=True)
    assert isinstance(static.past_key_values, StaticCache)
    assert torch.equal(static.sequences, _greedy(model, prompts))


def test_explicit_static_cache(family):
    model = _model(family)
    prompts = _prompts(family)
    cache = StaticCache(config=model.config, max_cache_len=PROMPT_LEN + NEW_TOKENS)
    assert torch.equal(_greedy(model, prompts, past_key_values=cache), _greedy(model, prompts))


def test_compiled_static_decoding(family):
    """generate's own compiled decoding path (static cache + `_can_compile_fullgraph`) with fullgraph=True, so any
    graph break fails. On CPU it uses torch.compile's "eager" backend: it traces the whole decoding step with dynamo
    exactly as inductor would receive it, without the minutes of C++ code generation inductor needs on 2 cores."""
    model = _model(family)
    assert model._can_compile_fullgraph
    prompts = _prompts(family)
    compile_config = CompileConfig(fullgraph=True, backend="eager", dynamic=False)
    compile_config._compile_all_devices = True  # generate only auto-compiles on accelerators otherwise
    torch._dynamo.reset()
    compiled = _greedy(model, prompts, cache_implementation="static", compile_config=compile_config)
    assert torch.equal(compiled, _greedy(model, prompts))
    assert hasattr(model, "_compiled_call"), "generate did not take the compiled path"


def test_generate_from_inputs_embeds(family):
    model = _model(family)
    prompts = _prompts(family)
    embeds = model.get_input_embeddings()(prompts)
    from_embeds = _greedy(model, None, inputs_embeds=embeds)
    # Only new tokens come back (there are no prompt ids to return).
    assert torch.equal(from_embeds, _greedy(model, prompts)[:, PROMPT_LEN:])


def test_continue_from_returned_cache(family):
    model = _model(family)
    prompts = _prompts(family)
    first = model.generate(prompts, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0,
                           return_dict_in_generate=True)
    assert isinstance(first.past_key_values, DynamicCache)
    continued = model.generate(first.sequences, past_key_values=first.past_key_values, max_new_tokens=4,
                               min_new_tokens=4, do_sample=False, pad_token_id=0)
    in_one_go = model.generate(prompts, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(continued, in_one_go)


def test_return_dict_in_generate_outputs(family):
    model = _model(family, attn_implementation="eager")  # attention weights need the eager kernel
    n_layer = model.config.num_hidden_layers
    out = _greedy(model, _prompts(family), return_dict_in_generate=True, output_scores=True, output_logits=True,
                  output_attentions=True, output_hidden_states=True)
    vocab_size = model.config.vocab_size
    assert len(out.scores) == len(out.logits) == NEW_TOKENS
    assert all(score.shape == (2, vocab_size) for score in out.scores)
    # One entry per generated token; the first covers the whole prompt, the rest one position each.
    assert len(out.attentions) == len(out.hidden_states) == NEW_TOKENS
    assert len(out.attentions[0]) == n_layer and len(out.hidden_states[0]) == n_layer + 1
    assert out.attentions[0][0].shape[-2:] == (PROMPT_LEN, PROMPT_LEN)
    assert out.attentions[-1][0].shape[-2:] == (1, PROMPT_LEN + NEW_TOKENS - 1)
    assert out.hidden_states[-1][-1].shape[:2] == (2, 1)
    transition = model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
    assert transition.shape == (2, NEW_TOKENS) and torch.all(transition <= 0)
