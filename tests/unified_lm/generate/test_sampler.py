"""The sampler: modality state machine, KV-cached decoding, classifier-free guidance, seeds, outputs and the CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from unified_lm.generate.sampler import SampleEvent, Sampler, SamplerTrace, split_segments
from unified_lm.generate.sampling import (
    Guidance,
    SamplingConfig,
    apply_repetition_penalty,
    draw,
    filter_logits,
    guided_logits,
)
from unified_lm.generate.segments import Prompt
from unified_lm.model.config import preset


def test_modality_state_machine_over_many_samples(vocab, tiny_lm, boost, config, check_structure, grid, world_prompts):
    model = tiny_lm(vocab)
    sampler = Sampler(model, vocab, grid)
    grid_tokens = grid[0] * grid[1]
    pictures = 0
    for seed, processor in [(0, boost(vocab.special.boi, 5.0)), (1, boost(vocab.special.eoi, 50.0)), (2, None)]:
        settings = config(max_new_tokens=90, max_images=3, seed=seed, text={"temperature": 1.5, "top_p": 1.0},
                          image={"temperature": 1.0, "top_k": 20})
        documents = sampler.generate(world_prompts * 2, settings, logits_processor=processor)
        for document in documents:
            pictures += check_structure(document.tokens, vocab, grid_tokens, 3)
            assert all(image.shape == grid for image in document.images)
            assert len(document.tokens) <= 90
            assert document.finish_reason == ("eos" if document.tokens[-1] == vocab.special.eos else "length")
    assert pictures >= 6  # the boosted run really drew pictures


def test_begin_of_image_blocked_when_a_picture_cannot_fit(vocab, tiny_lm, boost, config, check_structure, grid, world_prompts):
    sampler = Sampler(tiny_lm(vocab), vocab, grid)
    always_picture = boost(vocab.special.boi, 1000.0)
    grid_tokens = grid[0] * grid[1]
    greedy = {"text": {"temperature": 0.0}, "image": {"temperature": 0.0}}
    short = sampler.generate([world_prompts[0]], config(max_new_tokens=grid_tokens + 1, **greedy), logits_processor=always_picture)[0]
    assert vocab.special.boi not in short.tokens and short.finish_reason == "length"
    exact = sampler.generate([world_prompts[0]], config(max_new_tokens=grid_tokens + 2, **greedy), logits_processor=always_picture)[0]
    assert exact.tokens[0] == vocab.special.boi and exact.tokens[-1] == vocab.special.eoi and len(exact.images) == 1
    counted = sampler.generate([world_prompts[0]], config(max_new_tokens=80, max_images=2, **greedy),
                               logits_processor=always_picture)[0]
    assert counted.tokens.count(vocab.special.boi) == 2
    check_structure(counted.tokens, vocab, grid_tokens, 2)
    text_only = sampler.generate([world_prompts[0]], config(mode="text", max_new_tokens=60, **greedy),
                                 logits_processor=always_picture)[0]
    assert not any(vocab.in_picture(t) for t in text_only.tokens)


@pytest.mark.parametrize("guidance", ["none", "2way", "3way"])
def test_cached_logits_equal_full_recomputation(vocab, guidance, tiny_lm, boost, config, grid):
    """Every row's logits at every step (the full documents and both guidance contexts) equal a full forward
    over that row's context without any cache (fp32, 1e-5)."""
    model = tiny_lm(vocab)
    sampler = Sampler(model, vocab, grid)
    prompt_picture = np.arange(16).reshape(grid) % vocab.codebook_size
    prompts = [Prompt(["a red circle."]), Prompt([prompt_picture, "a blue square at the top right and more words"])]
    trace = SamplerTrace()
    settings = config(max_new_tokens=45, max_images=2, guidance={"mode": guidance, "scale": 2.0, "image_scale": 1.5})
    documents = sampler.generate(prompts, settings, logits_processor=boost(vocab.special.boi, 6.0), trace=trace)
    assert any(d.images for d in documents)
    special, batch = vocab.special, len(prompts)
    contexts = Guidance(guidance).contexts
    assert model.config.image_positions  # the sampler must track every code's place in its picture

    def full(sequence: list[int]) -> torch.Tensor:
        tokens = torch.tensor([sequence])
        return model(tokens, code_positions=vocab.code_positions(tokens))[0, -1]

    for row, document in enumerate(documents):
        prompt = sampler.encode_prompt(prompts[row], "interleaved")
        for step in range(len(document.tokens)):
            sequence = prompt + document.tokens[:step]
            torch.testing.assert_close(trace.raw[step][row], full(sequence), rtol=1e-5, atol=1e-5)
            if contexts == 1 or not trace.in_image[step][row]:
                continue
            last_boi = len(sequence) - 1 - sequence[::-1].index(special.boi)
            unconditional = [special.bos] + sequence[last_boi:]
            torch.testing.assert_close(trace.raw[step][(contexts - 1) * batch + row], full(unconditional),
                                       rtol=1e-5, atol=1e-5)
            if contexts == 3:
                image_only = [special.bos] + [t for t in sequence[1:] if vocab.in_picture(t)]
                torch.testing.assert_close(trace.raw[step][batch + row], full(image_only), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("guidance", ["2way", "3way"])
def test_guided_logits_equal_the_formula(vocab, guidance, tiny_lm, config, grid, world_prompts):
    sampler = Sampler(tiny_lm(vocab), vocab, grid)
    trace = SamplerTrace()
    scale, image_scale = 2.5, 1.3
    settings = config(mode="image", guidance={"mode": guidance, "scale": scale, "image_scale": image_scale})
    sampler.generate(world_prompts[:2], settings, trace=trace)
    batch = 2
    for raw, guided, in_image in zip(trace.raw, trace.guided, trace.in_image):
        full = raw[:batch].double()
        if guidance == "2way":
            uncond = raw[batch:].double()
            expected = uncond + scale * (full - uncond)
        else:
            image_only, uncond = raw[batch : 2 * batch].double(), raw[2 * batch :].double()
            expected = uncond + image_scale * (image_only - uncond) + scale * (full - image_only)
        for row in range(batch):
            reference = expected[row] if in_image[row] else full[row]
            torch.testing.assert_close(guided[row].double(), reference, rtol=1e-5, atol=1e-4)


def test_batch_equals_prompts_one_by_one_and_seeds_reproduce(vocab, tiny_lm, boost, config, grid, world_prompts):
    sampler = Sampler(tiny_lm(vocab), vocab, grid)
    settings = config(max_new_tokens=50, seed=7, text={"temperature": 1.0, "top_k": 50, "repetition_penalty": 1.3},
                      guidance={"mode": "2way"})
    processor = boost(vocab.special.boi, 4.0)
    together = sampler.generate(world_prompts, settings, logits_processor=processor)
    alone = [sampler.generate([Prompt(p.segments, seed=7 + i)], settings, logits_processor=processor)[0]
             for i, p in enumerate(world_prompts)]
    assert [d.tokens for d in together] == [d.tokens for d in alone]
    again = sampler.generate(world_prompts, settings, logits_processor=processor)
    assert [d.tokens for d in again] == [d.tokens for d in together]
    other = sampler.generate(world_prompts, config(max_new_tokens=50, seed=8, text={"temperature": 1.0, "top_k": 50}),
                             logits_processor=processor)
    assert [d.tokens for d in other] != [d.tokens for d in together]


def test_image_and_understanding_modes(vocab, tiny_lm, boost, config, check_structure, grid, world_prompts):
    sampler = Sampler(tiny_lm(vocab), vocab, grid)
    documents = sampler.generate(world_prompts, config(mode="image", guidance={"mode": "3way"}))
    for document in documents:
        assert document.finish_reason == "image" and len(document.images) == 1
        assert len(document.tokens) == grid[0] * grid[1] + 1  # codes + <eoi> (the prompt ends with <boi>)
        check_structure(document.tokens, vocab, 16, 1, starts_in_image=True)
    picture = np.zeros(grid, dtype=np.int64)
    answer = sampler.generate([Prompt([picture, "Question: what is there? Answer:"])],
                              config(mode="understanding", max_new_tokens=20), logits_processor=boost(vocab.special.boi, 1000.0))[0]
    assert not any(vocab.in_picture(t) for t in answer.tokens)
    assert [s.kind for s in answer.prompt] == ["image", "text"] and np.array_equal(answer.prompt[0].codes, picture)
    with pytest.raises(ValueError, match="holds none"):
        sampler.generate([Prompt(["no picture here"])], config(mode="understanding"))


def test_bad_inputs_give_clear_errors(vocab, tiny_lm, config, grid):
    sampler = Sampler(tiny_lm(vocab, max_seq_len=32), vocab, grid)
    with pytest.raises(ValueError, match="prompt 1 is .* tokens; the model's context is 32"):
        sampler.generate([Prompt(["hi"]), Prompt(["a red circle. " * 20])], config())
    with pytest.raises(ValueError, match="mode must be one of"):
        sampler.generate([Prompt(["hi"])], SamplingConfig(mode="video"))
    with pytest.raises(ValueError, match="a picture needs 17 more tokens"):
        sampler.generate([Prompt(["hi"])], config(mode="image", max_new_tokens=10))
    with pytest.raises(ValueError, match="image code out of range"):
        sampler.generate([Prompt([np.full(grid, 999), "hi"])], config())
    with pytest.raises(ValueError, match="picture grid is unknown"):
        Sampler(tiny_lm(vocab), vocab, None).generate([Prompt(["hi"])], config(mode="image"))
    with pytest.raises(ValueError, match="text.top_p must be in"):
        config(text={"top_p": 0.0})
    with pytest.raises(ValueError, match="unknown config field 'text.temprature'"):
        config(text={"temprature": 1.0})


def test_streaming_events_rebuild_the_document(vocab, tiny_lm, boost, config, grid, world_prompts):
    sampler = Sampler(tiny_lm(vocab), vocab, grid)
    events: list[SampleEvent] = []
    document = sampler.generate([world_prompts[0]], config(max_new_tokens=80), on_event=events.append,
                                logits_processor=boost(vocab.special.boi, 5.0))[0]
    tokens = [e.token for e in events if e.kind == "token"]
    assert tokens == document.tokens
    segments = [e.segment for e in events if e.kind == "segment"]
    assert [s.kind for s in segments] == [s.kind for s in document.segments] and document.images
    streamed, texts = "", []
    for event in events:
        if event.kind == "token" and event.modality == "text":
            streamed += event.text
        elif event.kind == "segment" and event.modality == "text":
            texts.append(event.segment.text)
    assert streamed == "".join(texts) == "".join(s.text for s in document.segments if s.kind == "text")
    assert events[-1].kind == "done" and events[-1].document is document
    assert [s.kind for s in split_segments(document.tokens, vocab, grid)] == [s.kind for s in document.segments]


def test_logit_filters_and_penalty():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0, 5.0]])
    kept = filter_logits(logits, torch.tensor([1.0, 1.0]), torch.tensor([2, 0]), torch.tensor([1.0, 1.0]))
    assert torch.isfinite(kept[0]).tolist() == [True, True, False, False, False]
    assert torch.isfinite(kept[1]).all()
    probs = logits[0].softmax(-1)  # 0.64, 0.23, 0.09, ...: top_p 0.8 keeps the first two (0.64 < 0.8 <= 0.87)
    kept = filter_logits(logits[:1], torch.tensor([1.0]), torch.tensor([0]), torch.tensor([0.8]))
    assert torch.isfinite(kept[0]).tolist() == [True, True, False, False, False] and probs[0] < 0.8
    kept = filter_logits(logits[:1], torch.tensor([0.5]), torch.tensor([0]), torch.tensor([0.01]))
    assert torch.isfinite(kept[0]).sum() == 1 and kept[0, 0] == 6.0  # temperature divides; one token survives
    penalised = apply_repetition_penalty(logits, torch.tensor([[True, False, False, False, True]] * 2), torch.tensor([2.0, 2.0]))
    assert penalised[0].tolist() == [1.5, 2.0, 1.0, 0.0, -2.0] and penalised[1, 4] == 2.5
    noise = torch.ones(2, 5)
    assert draw(logits, noise, torch.tensor([True, False])).tolist() == [0, 4]
    raw = torch.randn(6, 5, dtype=torch.float64)
    torch.testing.assert_close(guided_logits(raw, Guidance("3way", 3.0, 1.2)),
                               raw[4:] + 1.2 * (raw[2:4] - raw[4:]) + 3.0 * (raw[:2] - raw[2:4]))
    counts = torch.zeros(5)
    generator = torch.Generator().manual_seed(0)
    for _ in range(4000):
        noise = torch.empty(1, 5).exponential_(generator=generator)
        counts[draw(logits[:1], noise, torch.tensor([False]))] += 1
    torch.testing.assert_close(counts / 4000, logits[0].softmax(-1), atol=0.03, rtol=0)  # the race samples softmax


def test_sample_cli_writes_html_and_refuses_bad_input(lm_data, tiny_run, tmp_path, capsys, tiny_lm):
    from unified_lm.cli import main
    from unified_lm.model.checkpoint import write_model_files
    from unified_lm.tokens.vocab import build_vocabulary
    from vqtok.checkpoint import read_checkpoint

    _, _, meta = read_checkpoint(tiny_run)
    vocab = build_vocabulary(tmp_path / "vocab", None, 0, 64, meta["tokenizer"], lm_data.vocab_dir / "text.model")
    run_config = preset("tiny")
    run_config.model.vocab_size = vocab.size
    model = tiny_lm(vocab, max_seq_len=run_config.model.max_seq_len)
    checkpoint = tmp_path / "lm" / "checkpoints" / "step_00000001"
    write_model_files(checkpoint, model.state_dict(), run_config, vocab, {"step": 1, "image_grids": {"4x4": 9}})
    (tmp_path / "lm" / "latest").write_text("step_00000001\n")
    picture = lm_data.world / "images" / sorted(p.name for p in (lm_data.world / "images").iterdir())[0]
    out = tmp_path / "samples"
    code = main(["sample", "--ckpt", str(tmp_path / "lm"), "--tokenizer", str(tiny_run), "--prompt", "a red circle.",
                 "--prompt", "Step 1:", "--image", str(picture), "--out", str(out), "--max-new-tokens", "60",
                 "--cfg", "2way", "--num-samples", "2", "--stream"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    summary = json.loads(printed.out.strip().splitlines()[-1])
    assert summary["documents"] == 4
    page = (out / "index.html").read_text()
    assert page.count("<article>") == 4 and page.count("data:image/png;base64,") >= 4  # prompt pictures inline
    record = json.loads((out / "sample-000.json").read_text())
    assert record["prompt"][0]["type"] == "image" and record["prompt"][0]["grid"] == [4, 4]
    assert (out / record["prompt"][0]["png"]).is_file() and (out / "sample-003.md").is_file()
    assert record["settings"]["image_grid"] == [4, 4]

    def error(*argv) -> str:
        assert main(["sample", "--ckpt", str(tmp_path / "lm"), "--out", str(tmp_path / "bad"), *argv]) == 2
        return capsys.readouterr().err

    assert "context is 128 tokens" in error("--mode", "text", "--prompt", "word " * 200)
    assert "prompt picture not found" in error("--tokenizer", str(tiny_run), "--prompt", "x", "--image", str(tmp_path / "none.png"))
    assert "needs the vqtok tokenizer" in error("--prompt", "x")
    assert "not found" in main_error(main, capsys, "--ckpt", str(tmp_path / "missing"), "--mode", "text", "--prompt", "x",
                                     "--out", str(tmp_path / "bad"))
    other = build_vocabulary(tmp_path / "vocab32", None, 0, 32, None, lm_data.vocab_dir / "text.model")
    run_config.model.vocab_size = other.size
    write_model_files(tmp_path / "ckpt32", tiny_lm(other, max_seq_len=128).state_dict(), run_config, other, {"step": 1})
    message = main_error(main, capsys, "--ckpt", str(tmp_path / "ckpt32"), "--tokenizer", str(tiny_run), "--prompt", "x",
                         "--out", str(tmp_path / "bad"), "--image-grid", "4x4")
    assert "codebook_size 64" in message and "32 image codes" in message
    with pytest.raises(SystemExit):
        main(["sample", "--ckpt", str(tmp_path / "lm"), "--mode", "video", "--prompt", "x", "--out", str(tmp_path / "bad")])
    assert "invalid choice: 'video'" in capsys.readouterr().err


def main_error(main, capsys, *argv) -> str:
    assert main(["sample", *argv]) == 2
    return capsys.readouterr().err


def test_prompt_file_format(tmp_path):
    from unified_lm.generate.prompts import read_prompt_file

    (tmp_path / "p.jsonl").write_text('{"segments": [{"image": "a.png"}, {"text": "Question: why?"}], "seed": 3}\n\n'
                                      '{"text": "a red circle."}\n')
    specs = read_prompt_file(tmp_path / "p.jsonl")
    assert specs == [([(tmp_path / "a.png").resolve(), "Question: why?"], 3), (["a red circle."], None)]
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"segments": [{"video": "x"}]}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: each segment must be"):
        read_prompt_file(tmp_path / "bad.jsonl")
    with pytest.raises(FileNotFoundError, match="prompts file not found"):
        read_prompt_file(tmp_path / "missing.jsonl")


@pytest.mark.parametrize("guidance", ["none", "3way"])
def test_static_decode_step_gives_the_same_documents(vocab, guidance, tiny_lm, boost, config, grid, world_prompts):
    """The fixed-shape step (what CUDA graphs replay on GPU) run eagerly here: same logits, same documents."""
    model = tiny_lm(vocab)
    settings = config(max_new_tokens=60, guidance={"mode": guidance}, text={"temperature": 1.0, "top_p": 1.0})
    processor = boost(vocab.special.boi, 5.0)
    traces = [SamplerTrace(), SamplerTrace()]
    dynamic = Sampler(model, vocab, grid, static=False).generate(world_prompts, settings, logits_processor=processor,
                                                                 trace=traces[0])
    static = Sampler(model, vocab, grid, static=True).generate(world_prompts, settings, logits_processor=processor,
                                                               trace=traces[1])
    assert [d.tokens for d in static] == [d.tokens for d in dynamic]
    assert any(d.images for d in static)
    for a, b in zip(*(t.raw for t in traces)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
