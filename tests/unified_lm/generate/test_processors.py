"""The sampler's parts: each logits processor, the token selector and the stopping rules against hand computations
on small tensors; processors added to `Sampler.generate` without editing its loop; `KVCache.restart_row`."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from unified_lm.generate.processors import (
    CODES,
    EOI,
    TEXT,
    TEXT_OR_PICTURE,
    ClassifierFreeGuidance,
    ModalityMask,
    RepetitionPenalty,
    SamplingFilter,
    StepView,
    TokenSelector,
    allowed_table,
    stop_reason,
    stopping_rules,
)
from unified_lm.generate.sampler import Sampler
from unified_lm.generate.sampling import Guidance, ModalitySampling, RowGenerators
from unified_lm.model.transformer import KVCache

INF = float("inf")


def row(in_image=False, image_filled=0, images_made=0, budget=100, prompt=(), generated=()):
    return SimpleNamespace(in_image=in_image, image_filled=image_filled, images_made=images_made, budget=budget,
                           prompt=list(prompt), generated=list(generated))


def view(raw: torch.Tensor, rows) -> StepView:
    return StepView.of(raw, rows)


def forbid(*tokens: int):
    def processor(logits, step):
        return logits.index_fill(1, torch.tensor(tokens, device=logits.device), -INF)
    return processor


# -- processors added to generate ---------------------------------------------------------------------------------
def test_a_processor_added_without_editing_the_loop_decides_what_is_drawn(vocab, tiny_lm, boost, config, grid, world_prompts):
    sampler = Sampler(tiny_lm(vocab), vocab, grid)
    settings = config(mode="text", max_new_tokens=40, seed=3, text={"temperature": 1.0, "top_p": 1.0})
    plain = sampler.generate(world_prompts, settings)
    drawn = [t for d in plain for t in d.tokens if vocab.is_text(t)]
    common = max(set(drawn), key=drawn.count)
    assert drawn.count(common) >= 3  # the token the model likes most here
    same = sampler.generate(world_prompts, settings, processors=[lambda logits, step: logits])
    assert [d.tokens for d in same] == [d.tokens for d in plain]
    without = sampler.generate(world_prompts, settings, processors=[forbid(common)])
    assert all(common not in d.tokens for d in without) and [d.tokens for d in without] != [d.tokens for d in plain]
    # the processors run after logits_processor: a huge boost of the token does not bring it back
    boosted = sampler.generate(world_prompts, settings, logits_processor=boost(common, 1e4), processors=[forbid(common)])
    assert all(common not in d.tokens for d in boosted)
    # ... and before the modality mask: boosting <bos> (never allowed) changes nothing
    masked = sampler.generate(world_prompts, settings, processors=[lambda logits, step: boost(vocab.special.bos, 1e4)(logits)])
    assert [d.tokens for d in masked] == [d.tokens for d in plain]


def test_a_processor_reads_the_step_picture_rows_only(vocab, tiny_lm, boost, config, check_structure, grid, world_prompts):
    """A processor that keeps picture rows to four codes: every picture drawn uses only them, while text (and
    the structure the state machine enforces) is untouched."""
    sampler = Sampler(tiny_lm(vocab), vocab, grid)
    allowed_codes = torch.tensor(vocab.image_token_ids[:4])

    def four_codes(logits, step):
        other_codes = torch.from_numpy(vocab.image_mask).to(logits.device)
        other_codes[allowed_codes] = False
        return logits.masked_fill(step.in_image[:, None] & other_codes, -INF)

    settings = config(max_new_tokens=90, max_images=3, seed=1, guidance={"mode": "2way"})
    documents = sampler.generate(world_prompts, settings, logits_processor=boost(vocab.special.boi, 6.0),
                                 processors=[four_codes])
    images = [image for d in documents for image in d.images]
    assert images and all(int(image.max()) < 4 for image in images)
    assert any(vocab.is_text(t) for d in documents for t in d.tokens)
    for document in documents:
        check_structure(document.tokens, vocab, grid[0] * grid[1], 3)


# -- each processor by hand ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["2way", "3way"])
def test_classifier_free_guidance_mixes_picture_rows_only(mode):
    guidance = Guidance(mode, scale=2.5, image_scale=1.5)
    raw = torch.randn(2 * guidance.contexts, 5, generator=torch.Generator().manual_seed(0))
    rows = [row(in_image=True), row()]
    mixed = ClassifierFreeGuidance(guidance)(raw[:2], view(raw, rows))
    if mode == "2way":
        full, uncond = raw[:2], raw[2:]
        expected = uncond + 2.5 * (full - uncond)
    else:
        full, image_only, uncond = raw[:2], raw[2:4], raw[4:]
        expected = uncond + 1.5 * (image_only - uncond) + 2.5 * (full - image_only)
    torch.testing.assert_close(mixed[0], expected[0])
    assert torch.equal(mixed[1], raw[1])
    text_only = [row(), row()]  # no picture row: the guidance rows are stale and are not read
    assert torch.equal(ClassifierFreeGuidance(guidance)(raw[:2], view(raw, text_only)), raw[:2])
    assert torch.equal(ClassifierFreeGuidance(Guidance("none"))(raw[:2], view(raw[:2], rows)), raw[:2])


def test_modality_mask_follows_the_state_machine():
    # ids: 0, 1 text; 2, 3 codes; 4 <eoi>; 5 <boi>
    table = torch.tensor([[1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 1, 0], [1, 1, 0, 0, 0, 1]], dtype=torch.bool)
    mask = ModalityMask(table, grid_tokens=2, max_images=1)
    rows = [row(budget=10), row(budget=10, generated=range(7)), row(images_made=1),
            row(in_image=True, image_filled=1, images_made=1), row(in_image=True, image_filled=2, images_made=1)]
    # a picture needs <boi> + 2 codes + <eoi> = 4 tokens: 3 left is too few; one picture made is the maximum
    assert [mask.state(r) for r in rows] == [TEXT_OR_PICTURE, TEXT, TEXT, CODES, EOI]
    logits = torch.arange(30, dtype=torch.float32).view(5, 6)
    masked = mask(logits, view(logits, rows))
    expected = torch.where(table[[TEXT_OR_PICTURE, TEXT, TEXT, CODES, EOI]], logits, -INF)
    assert torch.equal(masked, expected)


def test_allowed_table_of_a_vocabulary(vocab):
    table, special = allowed_table(vocab), vocab.special
    text, codes, eoi, text_or_picture = table
    assert text[special.eos] and text[5] and not text[0]  # sentencepiece's <unk> is never drawn
    assert not text[[special.boi, special.eoi, special.bos, special.pad, special.image]].any()
    assert torch.equal(codes, torch.from_numpy(vocab.image_mask))
    assert eoi.nonzero().flatten().tolist() == [special.eoi]
    expected = text.clone()
    expected[special.boi] = True
    assert torch.equal(text_or_picture, expected)
    assert table.shape == (4, vocab.size) and (TEXT, CODES, EOI, TEXT_OR_PICTURE) == (0, 1, 2, 3)


def test_repetition_penalty_on_text_rows_over_prompt_and_generated_text(vocab):
    code = int(vocab.image_token_ids[0])
    logits = torch.zeros(2, vocab.size)
    logits[:, [5, 6, 7, 8, code]] = torch.tensor([2.0, -1.0, 4.0, 3.0, 1.0])
    rows = [row(prompt=[vocab.special.bos, 5, 6], generated=[7, code]), row(in_image=True, prompt=[5, 6, 7, 8])]
    penalty = RepetitionPenalty(vocab, 2.0, "cpu")
    out = penalty(logits, view(logits, rows))
    # seen text ids divided by 2 when positive, multiplied when negative; the code (not text) and 8 (unseen) stay
    assert out[0, [5, 6, 7, 8, code]].tolist() == [1.0, -2.0, 2.0, 3.0, 1.0]
    assert torch.equal(out[1], logits[1])  # a picture row is never penalised
    rows[0].generated.append(8)  # the next step sees the new token
    assert penalty(logits, view(logits, rows))[0, 8] == 1.5


def test_sampling_filter_uses_each_rows_modality():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]] * 2)
    text = ModalitySampling(temperature=0.5, top_k=2)
    image = ModalitySampling(temperature=1.0, top_p=0.8)  # softmax 0.64, 0.23, ...: the first two reach 0.8
    out = SamplingFilter(text, image, "cpu")(logits, view(logits, [row(), row(in_image=True)]))
    assert out.tolist() == [[6.0, 4.0, -INF, -INF, -INF], [3.0, 2.0, -INF, -INF, -INF]]


def test_token_selector_races_each_rows_own_noise_and_is_greedy_at_temperature_zero():
    logits = torch.randn(2, 7, generator=torch.Generator().manual_seed(1))
    select = TokenSelector(RowGenerators([5, 6], torch.device("cpu")), ModalitySampling(temperature=0.0),
                           ModalitySampling(temperature=1.0), "cpu")
    rows = [row(), row(in_image=True)]
    first, second = select(logits, view(logits, rows)), select(logits, view(logits, rows))
    noise = RowGenerators([5, 6], torch.device("cpu"))
    expected = [(logits[1] - noise.exponential(7)[1].log()).argmax().item() for _ in range(2)]
    assert [first[0], second[0]] == [logits[0].argmax().item()] * 2
    assert [first[1], second[1]] == expected


def test_stopping_rules(vocab):
    special = vocab.special
    rules, image_rules = stopping_rules("interleaved", special), stopping_rules("image", special)
    assert stop_reason(rules, row(generated=[5, special.eos]), special.eos) == "eos"
    assert stop_reason(rules, row(generated=[special.eoi]), special.eoi) is None
    assert stop_reason(image_rules, row(generated=[special.eoi]), special.eoi) == "image"
    assert stop_reason(rules, row(budget=2, generated=[5, 6]), 6) == "length"
    assert stop_reason(rules, row(budget=2, generated=[5, special.eos]), special.eos) == "eos"  # eos comes first
    assert stop_reason(rules, row(budget=3, generated=[5, 6]), 6) is None


# -- the cache edits ----------------------------------------------------------------------------------------------
def test_kv_cache_restart_row_forgets_all_but_the_kept_slot(vocab, tiny_lm):
    model = tiny_lm(vocab)
    bos = vocab.special.bos
    cache = KVCache.allocate(model.config, 2, 8)
    prompts = torch.tensor([[bos, 10, 11, 12], [bos, 20, 21, 22]])
    model.decode(prompts, cache, torch.arange(4).expand(2, 4))
    cache.restart_row(1, keep_slot=0)
    assert cache.key_valid[:, : cache.length].tolist() == [[True] * 4, [True, False, False, False]]
    logits = model.decode(torch.tensor([[13], [30]]), cache, torch.tensor([[4], [1]]))[:, 0]
    # row 0 goes on; row 1 continues from its <bos> alone, positions restarting at 1
    torch.testing.assert_close(logits[0], model(torch.tensor([[bos, 10, 11, 12, 13]]))[0, -1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits[1], model(torch.tensor([[bos, 30]]))[0, -1], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="slot 5 is not written"):
        cache.restart_row(0, keep_slot=5)
    cache.advance(3)
    assert cache.length == 8
    with pytest.raises(ValueError, match="KV cache holds 8 slots"):
        cache.advance()
