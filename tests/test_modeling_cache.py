"""Generation state: chunked prefill, cached decode, padding, beam search."""

from __future__ import annotations

import pytest
import torch
from modeling_utils import PARITY_CONFIGS, randomize_

from dsv41.modeling import DeepseekV4Cache, DeepseekV4Config, DeepseekV4ForCausalLM


@pytest.fixture(scope="module", params=sorted(PARITY_CONFIGS))
def model(request):
    m = DeepseekV4ForCausalLM(DeepseekV4Config(**PARITY_CONFIGS[request.param])).eval()
    randomize_(m, seed=11)
    return m


IDS = torch.randint(0, 97, (2, 23), generator=torch.Generator().manual_seed(4))


@pytest.mark.parametrize("chunks", [[5, 1, 8, 1, 8], [1] * 23, [23], [3, 20]])
def test_chunked_prefill_equals_one_shot(model, chunks):
    with torch.no_grad():
        full = model(IDS, use_cache=False).logits
        cache, parts, start = DeepseekV4Cache(model.config), [], 0
        for n in chunks:
            parts.append(model(IDS[:, start : start + n], cache=cache, use_cache=True).logits)
            start += n
    assert (torch.cat(parts, 1) - full).abs().max() <= 1e-4


def test_cached_decode_equals_recomputation(model):
    prompt = IDS[:1, :9]
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=14, do_sample=False, output_scores=True, return_dict_in_generate=True)
        seq = out.sequences
        recomputed = model(seq, use_cache=False).logits[0, 8:-1]
    cached = torch.stack(out.scores, 1)[0]
    assert (cached - recomputed).abs().max() <= 1e-4


def test_padded_batch_equals_per_row(model):
    a, b = IDS[0, :11], IDS[1, :17]
    batch = torch.zeros(2, 17, dtype=torch.long)
    mask = torch.zeros(2, 17, dtype=torch.long)
    batch[0, 6:], mask[0, 6:] = a, 1
    batch[1], mask[1] = b, 1
    with torch.no_grad():
        padded = model(batch, attention_mask=mask, use_cache=False).logits
        assert (padded[0, 6:] - model(a[None], use_cache=False).logits[0]).abs().max() <= 1e-4
        assert (padded[1] - model(b[None], use_cache=False).logits[0]).abs().max() <= 1e-4
        generated = model.generate(batch, attention_mask=mask, max_new_tokens=10, do_sample=False)
        assert torch.equal(generated[0, 6:], model.generate(a[None], max_new_tokens=10, do_sample=False)[0])
        assert torch.equal(generated[1], model.generate(b[None], max_new_tokens=10, do_sample=False)[0])


def test_sampling_is_seeded_and_beam_search_runs(model):
    prompt = IDS[:1, :5]
    with torch.no_grad():
        torch.manual_seed(0)
        s1 = model.generate(prompt, max_new_tokens=8, do_sample=True, top_k=20, temperature=0.9)
        torch.manual_seed(0)
        s2 = model.generate(prompt, max_new_tokens=8, do_sample=True, top_k=20, temperature=0.9)
        beams = model.generate(prompt, max_new_tokens=6, num_beams=3, num_return_sequences=2, do_sample=False)
    assert torch.equal(s1, s2)
    assert beams.shape == (2, 11)
    # the best beam is a valid continuation: its own log-likelihood under recomputation is finite
    with torch.no_grad():
        assert torch.isfinite(model(beams, use_cache=False).logits).all()


def test_cache_reorder_selects_rows(model):
    with torch.no_grad():
        cache = DeepseekV4Cache(model.config)
        model(IDS[:, :10], cache=cache, use_cache=True)
        cache.reorder_cache(torch.tensor([1, 1]))
        step = model(IDS[:, 10:11].flip(0)[:1].expand(2, -1), cache=cache, use_cache=True).logits
    assert torch.allclose(step[0], step[1])


@pytest.mark.parametrize("plan", [[(9, 5), (7, 7), (1, 1), (6, 2)], [(3, 3), (11, 4)], [(1, 0), (12, 12)]])
def test_crop_rolls_back_exactly(model, plan):
    """Speculative decoding's pattern: feed k tokens, keep some, crop the rest, go on. After every
    crop the cache must behave exactly as if the removed tokens had never been fed: compared with a
    cache that only ever saw the kept tokens (windows closing inside the removed part included)."""
    ids = torch.randint(0, 97, (2, 60), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        spec, ref = DeepseekV4Cache(model.config), DeepseekV4Cache(model.config)
        model(ids[:, :5], cache=spec, use_cache=True)
        model(ids[:, :5], cache=ref, use_cache=True)
        spec.activate_past_recording()
        pos = 5
        for fed, kept in plan:
            junk = torch.randint(0, 97, (2, fed - kept), generator=torch.Generator().manual_seed(fed))
            chunk = torch.cat([ids[:, pos : pos + kept], junk], dim=1)
            model(chunk, cache=spec, use_cache=True)
            spec.crop(-(fed - kept))
            if kept:
                model(ids[:, pos : pos + kept], cache=ref, use_cache=True)
            pos += kept
            assert spec.get_seq_length() == ref.get_seq_length() == pos
            assert torch.equal(spec.seen, ref.seen)
            nxt = ids[:, pos : pos + 3]
            got = model(nxt, cache=spec, use_cache=True).logits
            want = model(nxt, cache=ref, use_cache=True).logits
            assert (got - want).abs().max() <= 1e-4
            spec.crop(-3)  # the probe is rolled back too; the reference is rebuilt from the kept tokens
            ref = DeepseekV4Cache(model.config)
            model(ids[:, :pos], cache=ref, use_cache=True)


def test_crop_errors(model):
    cache = DeepseekV4Cache(model.config)
    with torch.no_grad():
        model(IDS[:, :6], cache=cache, use_cache=True)
        with pytest.raises(RuntimeError, match="activate_past_recording"):
            cache.crop(-2)
        cache.crop(0)  # trimming back is always allowed
        cache.activate_past_recording()
        model(IDS[:, 6:9], cache=cache, use_cache=True)
        with pytest.raises(ValueError, match="cannot remove 4 tokens, only 3 were fed since the last crop"):
            cache.crop(-4)
        with pytest.raises(ValueError, match="negative number of tokens"):
            cache.crop(5)
        cache.crop(-3)
        for layer in cache.layers:  # what generate() does when it hands the cache back
            layer.record_past = False
        model(IDS[:, 6:8], cache=cache, use_cache=True)
        cache.crop(0)  # no rollback history is kept any more, keys are back to the window
        assert all(st.fed is None for layer in cache.layers for row in layer.rows for st in row.values())
        assert all(layer.keys.shape[1] <= model.config.sliding_window - 1 for layer in cache.layers)


def test_assisted_generation_equals_greedy(model):
    """Prompt-lookup (speculative) decoding crops the cache after every verification step; with an
    exact rollback its output equals plain greedy decoding, token for token."""
    prompt = torch.cat([IDS[:1, :8], IDS[:1, :8], IDS[:1, :4]], dim=1)  # repeats give lookup candidates
    with torch.no_grad():
        greedy = model.generate(prompt, max_new_tokens=20, do_sample=False)
        assisted = model.generate(prompt, max_new_tokens=20, do_sample=False, prompt_lookup_num_tokens=4)
    assert torch.equal(assisted, greedy)
