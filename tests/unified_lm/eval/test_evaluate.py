"""unified-lm eval: the scoring of generated text, the baselines, perplexity (the whole loop: tests/integration)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from unified_lm.eval.evaluate import (
    EvalSettings,
    Evaluator,
    WorldTasks,
    first_of_each,
    first_sentence,
    question_type,
    score_caption,
)
from unified_lm.model.config import ModelConfig
from unified_lm.model.transformer import Targets, UnifiedTransformer
from unified_lm.tokens.vocab import build_vocabulary
from unified_lm.world.check import derangement
from unified_lm.world.corpus import CAPTION_PREFIX, describe, sample_scene


def scenes(count: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [sample_scene(rng) for _ in range(count)]


def test_score_caption_is_exact_on_true_captions_and_low_on_shuffled_ones():
    truth = scenes(200)
    for scene in truth:
        scores = score_caption(CAPTION_PREFIX + describe(scene), scene)
        assert all(scores[key] == 1.0 for key in ("position", "colour", "shape", "size", "colour_shape", "count", "exact"))
        assert scores["extra_objects"] == 0.0 and scores.get("word", 1.0) == 1.0
    shift = derangement(len(truth), seed=3)
    shuffled = [score_caption(describe(truth[j]), scene) for scene, j in zip(truth, shift)]
    assert np.mean([s["colour_shape"] for s in shuffled]) < 0.1
    assert np.mean([s["exact"] for s in shuffled]) < 0.02


def test_score_caption_gives_partial_credit_attribute_by_attribute():
    scene = scenes(50, seed=1)[0]
    first = scene.objects[0]
    other_colour = next(c for c in ("red", "green", "blue") if c != first.colour)
    wrong = describe(scene).replace(f"{first.size} {first.colour} {first.shape}", f"{first.size} {other_colour} {first.shape}", 1)
    scores = score_caption(wrong, scene)
    assert scores["position"] == 1.0 and scores["shape"] == 1.0
    assert scores["colour"] == pytest.approx(1 - 1 / len(scene.objects))
    assert scores["exact"] == 0.0
    assert score_caption("nothing useful here", scene)["position"] == 0.0


def test_derangement_has_no_fixed_point_and_is_a_permutation():
    for count in (2, 3, 10, 101):
        shift = derangement(count, seed=count)
        assert sorted(shift) == list(range(count)) and all(i != j for i, j in enumerate(shift))
    assert derangement(10, 0) == derangement(10, 0)
    with pytest.raises(ValueError):
        derangement(1, 0)


def test_question_types_and_answers():
    assert question_type("Question: how many shapes are there? Answer:") == "total"
    assert question_type("Question: how many red circles are there? Answer:") == "count"
    assert question_type("Question: what colour is the shape at the top? Answer:") == "colour"
    assert question_type("Question: what is in the center? Answer:") == "what"
    assert question_type("Question: what word is written in the picture? Answer:") == "word"
    assert first_sentence(" a small red circle. Question: how") == "a small red circle"
    assert first_sentence("two") == "two"


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    texts = ["the quick brown fox jumps over the lazy dog"] * 50 + [describe(s) for s in scenes(100)]
    vocab = build_vocabulary(tmp_path_factory.mktemp("vocab"), texts, 400, 16)
    torch.manual_seed(0)
    model = UnifiedTransformer(ModelConfig(vocab_size=vocab.size, dim=32, n_layers=1, n_heads=2, n_kv_heads=1,
                                           max_seq_len=64)).eval()
    return model, vocab


def test_text_perplexity_matches_the_models_own_loss(text_model):
    model, vocab = text_model
    texts = ["the lazy dog jumps over the quick brown fox", "a red circle at the top left"]
    evaluator = Evaluator.__new__(Evaluator)  # perplexity needs no tokenizer or sampler
    evaluator.model, evaluator.vocab, evaluator.settings = model, vocab, EvalSettings(text_context=8)
    result = evaluator.text_perplexity(texts).metrics
    nats, pieces = 0.0, 0
    for text in texts:  # the same windows computed through the model's training loss
        ids = [vocab.special.bos] + vocab.encode_text(text) + [vocab.special.eos]
        for start in range(0, len(ids) - 1, 8):
            chunk = torch.tensor(ids[start : start + 9])[None]
            with torch.no_grad():
                output = model(chunk[:, :-1], targets=Targets(chunk[:, 1:]))
            count = chunk.shape[1] - 1
            nats += float(output.loss - output.z_loss) * count
            pieces += count
    assert result["pieces"] == pieces
    assert result["perplexity"] == pytest.approx(math.exp(nats / pieces), rel=1e-4)
    assert result["bits_per_character"] == pytest.approx(nats / math.log(2) / sum(map(len, texts)), rel=1e-4)
    # an untrained model is near uniform over the whole vocabulary
    assert 0.5 * vocab.size < result["perplexity"] < 2 * vocab.size


def test_the_untrained_baseline_reads_the_first_items_of_every_task():
    tasks = WorldTasks(list(range(10)), list(range(20, 25)), list(range(30, 33)), [[1], [2], [3]])
    assert first_of_each(tasks, 2) == WorldTasks([0, 1], [20, 21], [30, 31], [[1], [2]])
    assert first_of_each(tasks, 100) == tasks


def test_eval_scores_every_held_out_item_and_the_untrained_model_its_first_few(tmp_path, lm_run, tiny_run):
    """`unified-lm eval --count 0`: every held-out document of each task; the untrained baseline reads only the
    first --baseline-count, and the tokenizer rows still read every held-out picture."""
    from unified_lm.cli import main as lm_main
    from unified_lm.model.checkpoint import write_model_files
    from unified_lm.model.config import preset
    from unified_lm.tokens.vocab import Vocabulary
    from unified_lm.train.initial import untrained_model
    from unified_lm.world.corpus import generate_world, read_documents

    vocab = Vocabulary.load(lm_run[1])
    config = preset("tiny")
    config.model.vocab_size, config.model.max_seq_len = vocab.size, 1024
    run = tmp_path / "lm"  # 12x12 codes a picture: 24 px through the f2 test tokenizer, the checker's smallest
    write_model_files(run / "checkpoints" / "step_00000001", untrained_model(config).state_dict(), config, vocab,
                      {"step": 1, "image_grids": {"12x12": 1}})
    (run / "latest").write_text("step_00000001\n")
    world = generate_world(tmp_path / "world", num_scenes=200, seed=1, image_size=32).out_dir
    out = tmp_path / "eval"
    argv = ["eval", "--ckpt", run, "--tokenizer", tiny_run, "--world", world, "--out", out, "--photos", "none",
            "--text-documents", "0", "--baseline-count", "2", "--stories", "2"]
    assert lm_main([str(a) for a in argv]) == 0
    results = json.loads((out / "eval.json").read_text())["results"]
    held_out = sum(d["kind"] == "image_to_text" for d in read_documents(world, "heldout"))
    assert held_out > 2 and results["tokenizer_world"]["trained"]["images"] == held_out
    assert set(results["text_to_image"]) == {"trained", "before_training", "chance"}
