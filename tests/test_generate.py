"""Generation with the key/value cache: equals recomputing the full context, samples from the
distribution it claims, stops where told."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax import beam, model as gpt
from llm_jax import sampling

CFG = gpt.ModelConfig(vocab_size=50, n_layer=2, n_embd=32, n_head=4, block_size=32)


@pytest.fixture(scope="module")
def model():
    return gpt.init_params(CFG, jax.random.key(0))


def full_context_greedy(graphdef, params, prompt, n, block_size=CFG.block_size):
    """The reference: the whole context through `forward` at every step, no cache."""
    step = jax.jit(lambda w, t: gpt.forward(graphdef, params, w)[0, t - 1])
    tokens = list(prompt)
    for _ in range(n):
        window = np.zeros((1, block_size), np.int32)
        window[0, : len(tokens)] = tokens  # right padding: causal, so it changes nothing
        tokens.append(int(jnp.argmax(step(window, len(tokens)))))
    return tokens[len(prompt):]


def test_cached_greedy_equals_full_recompute_batched(model):
    graphdef, params = model
    prompts = [[1], [3, 4, 5, 6, 7], [9, 8, 7, 6, 5, 4, 3, 2, 1], list(range(20, 38))]
    n = 14  # the longest row fills block_size exactly: no sliding window yet
    out = sampling.generate_batch(graphdef, params, prompts, max_new_tokens=n,
                                  key=jax.random.key(0), temperature=0.0)
    for prompt, tokens in zip(prompts, out):
        assert tokens == full_context_greedy(graphdef, params, prompt, n)


def test_attention_window_is_the_smallest_power_of_two_that_holds_the_chunk():
    assert [sampling.attention_window(e, 256) for e in (1, 64, 65, 128, 129, 200, 256)] \
        == [64, 64, 128, 128, 256, 256, 256]
    assert sampling.attention_window(20, 32) == 32 and sampling.attention_window(90, 96) == 96


def test_decoding_over_a_growing_attention_window_equals_full_recompute():
    """block_size 160: decode chunks attend to 64, then 128, then all 160 slots; the tokens
    are those of recomputing the whole context, for rows of different lengths."""
    cfg = gpt.ModelConfig(vocab_size=50, n_layer=2, n_embd=32, n_head=4, block_size=160)
    graphdef, params = gpt.init_params(cfg, jax.random.key(1))
    # larger weights than at init: attention then decides the tokens, so a slot left out of
    # the window would change them
    params = jax.tree.map(lambda x: 6 * x, params)
    prompts = [[1, 2, 3], list(range(5, 45))]
    n = 110  # the long row's last chunks run at slot 128 and beyond
    out = sampling.generate_batch(graphdef, params, prompts, max_new_tokens=n,
                                  key=jax.random.key(0), temperature=0.0, chunk=8)
    for prompt, tokens in zip(prompts, out):
        assert tokens == full_context_greedy(graphdef, params, prompt, n, cfg.block_size)


def test_cached_logits_match_full_forward(model):
    graphdef, params = model
    seq = np.array([[5, 17, 3, 42, 8, 8, 1, 30, 2, 11]], np.int32)
    full = gpt.forward(graphdef, params, seq)[0]
    cache = gpt.init_cache(CFG, 1)
    valid = jnp.zeros((1, CFG.block_size), bool)
    for t in range(seq.shape[1]):
        valid = valid.at[:, t].set(True)
        logits, cache = gpt.forward_cached(graphdef, params, seq[:, t:t + 1],
                                           jnp.array([[t]]), t, cache, valid)
        np.testing.assert_allclose(logits[0, 0], full[t], atol=1e-5, rtol=1e-5)


def test_left_padding_changes_nothing(model):
    graphdef, params = model
    seq = np.array([[5, 17, 3, 42]], np.int32)
    full = gpt.forward(graphdef, params, seq)[0]
    idx = np.array([[0, 0, 0, 5, 17, 3, 42]], np.int32)
    mask = (np.arange(7) >= 3)[None]
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    valid = jnp.zeros((1, CFG.block_size), bool).at[:, :7].set(mask)
    logits, _ = gpt.forward_cached(graphdef, params, idx, pos, 0, gpt.init_cache(CFG, 1), valid)
    np.testing.assert_allclose(logits[0, 3:], full, atol=1e-5, rtol=1e-5)


def test_top_k_one_is_greedy_and_seed_reproducible(model):
    graphdef, params = model
    kw = dict(max_new_tokens=10, key=jax.random.key(3))
    greedy = list(sampling.generate(graphdef, params, [1, 2], temperature=0.0, **kw))
    assert list(sampling.generate(graphdef, params, [1, 2], temperature=1.0, top_k=1, **kw)) \
        == greedy
    a = list(sampling.generate(graphdef, params, [1, 2], temperature=1.0, top_p=0.9, **kw))
    b = list(sampling.generate(graphdef, params, [1, 2], temperature=1.0, top_p=0.9, **kw))
    c = list(sampling.generate(graphdef, params, [1, 2], temperature=1.0, top_p=0.9,
                               max_new_tokens=10, key=jax.random.key(4)))
    assert a == b and a != c
    for chunk in (1, 3):  # the draws depend on the seed and the step, not on the chunking
        assert list(sampling.generate(graphdef, params, [1, 2], temperature=1.0, top_p=0.9,
                                      chunk=chunk, **kw)) == a


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 3, 1.0),
                                                     (1.3, 0, 0.8), (1.0, 4, 0.7)])
def test_token_choice_matches_the_restricted_softmax(temperature, top_k, top_p):
    logits = jnp.array([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
    n = 200_000
    draws = jax.jit(lambda k: sampling.choose_token(jnp.broadcast_to(logits, (n, 8)), k,
                                                    temperature, top_k, top_p))(
        jax.random.key(0))
    freq = np.bincount(np.asarray(draws), minlength=8) / n
    p = np.asarray(jax.nn.softmax(logits / temperature))
    keep = np.ones(8, bool)
    if top_k:
        keep &= np.arange(8) < top_k  # the logits are sorted
    before = np.cumsum(p * keep) - p * keep
    keep &= before / (p * keep).sum() < top_p
    expected = np.where(keep, p, 0) / (p * keep).sum()
    assert np.all(freq[~keep] == 0)
    assert np.abs(freq - expected).max() < 0.005  # std of each frequency is at most 0.0011
    assert keep.sum() >= 2  # a real distribution, not a single token


def test_stops_at_end_of_text(model):
    graphdef, params = model
    greedy = sampling.generate_batch(graphdef, params, [[1, 2]], max_new_tokens=10,
                                     key=jax.random.key(0), temperature=0.0)[0]
    stop = greedy[3]
    out = list(sampling.generate(graphdef, params, [1, 2], max_new_tokens=10,
                                 key=jax.random.key(0), temperature=0.0, stop_id=stop))
    assert out == greedy[: greedy.index(stop) + 1]


def test_cut_at_stop_string():
    assert sampling.cut_at_stop("abc\n\ndef", ["\n\n", "zz"]) == ("abc", True)
    assert sampling.cut_at_stop("abc", ["\n\n"]) == ("abc", False)


def test_beam_of_one_is_greedy(model):
    graphdef, params = model
    greedy = list(sampling.generate(graphdef, params, [4, 2], max_new_tokens=8,
                                    key=jax.random.key(0), temperature=0.0))
    assert beam.beam_search(graphdef, params, [4, 2], beam=1, max_new_tokens=8) == greedy


@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 2.0])
def test_wide_beam_finds_the_best_sequence_by_enumeration(length_penalty):
    cfg = gpt.ModelConfig(vocab_size=5, vocab_multiple=1, n_layer=2, n_embd=32, n_head=4,
                          block_size=16)
    graphdef, params = gpt.init_params(cfg, jax.random.key(2))
    params = jax.tree.map(lambda p: p * 3, params)  # sharper, varied next-token distributions
    prompt, eot, steps = [1, 3], 0, 3
    logp = jax.jit(lambda s: jax.nn.log_softmax(gpt.forward(graphdef, params, s)[0, -1]))
    best, best_seq = -np.inf, None
    for n in range(1, steps + 1):
        for seq in itertools.product(range(5), repeat=n):
            if eot in seq[:-1] or (n < steps and seq[-1] != eot):
                continue  # a sequence ends at end-of-text or at max_new_tokens
            score = sum(float(logp(np.array([prompt + list(seq[:i])], np.int32))[seq[i]])
                        for i in range(n))
            if score / n ** length_penalty > best:
                best, best_seq = score / n ** length_penalty, list(seq)
    found = beam.beam_search(graphdef, params, prompt, beam=125, max_new_tokens=steps,
                                 length_penalty=length_penalty, stop_id=eot)
    assert found == best_seq
    greedy = beam.beam_search(graphdef, params, prompt, beam=1, max_new_tokens=steps,
                                  length_penalty=length_penalty, stop_id=eot)
    assert found != greedy  # a case where searching wider matters


def test_batched_beam_search_equals_one_prompt_at_a_time(model):
    graphdef, params = model
    prompts = [[4, 2], [7, 1, 9, 3, 3, 8], [11]]
    kw = dict(beam=3, max_new_tokens=6, length_penalty=0.6, stop_id=5)
    batched = beam.beam_search_batch(graphdef, params, prompts, **kw)
    assert batched == [beam.beam_search(graphdef, params, p, **kw) for p in prompts]
    assert all(1 <= len(b) <= 6 for b in batched)


def test_sliding_window_equals_recomputing_the_window(model):
    """Past block_size, the cache restarts from the last block_size // 2 tokens: the result is
    the greedy continuation whose context is that window, growing until it is full again."""
    graphdef, params = model
    S = CFG.block_size
    prompt, n = list(range(1, 9)), 3 * S  # 8 tokens: no prompt padding; two slides and more
    out = sampling.generate_batch(graphdef, params, [prompt], max_new_tokens=n,
                                  key=jax.random.key(0), temperature=0.0, chunk=5)[0]
    step = jax.jit(lambda w, t: gpt.forward(graphdef, params, w)[0, t - 1])
    tokens, start = list(prompt), 0
    for _ in range(n):
        if len(tokens) - start > S:
            start = len(tokens) - S // 2
        window = np.zeros((1, S), np.int32)
        window[0, : len(tokens) - start] = tokens[start:]
        tokens.append(int(jnp.argmax(step(window, len(tokens) - start))))
    assert out == tokens[len(prompt):]


def test_the_next_chunk_is_queued_before_this_ones_tokens_are_read(model, monkeypatch):
    """One chunk of look-ahead: when the caller gets a chunk, the next one is already on its
    way to the device; none is queued past max_new_tokens; the tokens are those of no
    look-ahead (chunks of 4 equal chunks of 1)."""
    graphdef, params = model
    launched = []
    real = sampling._decode_chunk

    def counting(*args, **kw):
        launched.append(kw["steps"])
        return real(*args, **kw)

    monkeypatch.setattr(sampling, "_decode_chunk", counting)
    kw = dict(max_new_tokens=1 + 2 * 4, key=jax.random.key(0), temperature=0.8)
    seen = []  # chunks launched when each chunk reached the caller
    chunks = []
    for new in sampling.stream(graphdef, params, [[1, 2, 3]], chunk=4, **kw):
        seen.append(len(launched))
        chunks.append(new[0])
    assert [len(c) for c in chunks] == [1, 4, 4]  # the prefill's token, then two chunks
    assert seen == [1, 2, 2] and launched == [4, 4]  # ahead by one, and nothing past the end
    one_by_one = sampling.generate_batch(graphdef, params, [[1, 2, 3]], chunk=1, **kw)[0]
    assert sum(chunks, []) == one_by_one


def test_stop_test_ends_a_row_early(model):
    graphdef, params = model
    kw = dict(max_new_tokens=20, key=jax.random.key(0), temperature=0.0)
    full = sampling.generate_batch(graphdef, params, [[1, 2], [3]], **kw)
    target = full[0][6]
    stop = lambda ids: target in ids  # noqa: E731  (each row ends after its first `target`)
    out = sampling.generate_batch(graphdef, params, [[1, 2], [3]], stop=stop, **kw)
    for row, got in zip(full, out):
        expected = row[: row.index(target) + 1] if target in row else row
        assert got == expected


def test_generate_text_stops_at_a_stop_string(model):
    from llm_jax.tokenizers import CharTokenizer

    graphdef, params = model
    tok = CharTokenizer("".join(chr(65 + i) for i in range(CFG.vocab_size)))
    kw = dict(max_new_tokens=20, key=jax.random.key(0), temperature=0.0)
    full = sampling.generate_text(tok, graphdef, params, ["AB"], **kw)[0]
    stop = full[4:6]
    out = sampling.generate_text(tok, graphdef, params, ["AB"], stop=[stop], **kw)[0]
    assert out == full[: full.index(stop)]
