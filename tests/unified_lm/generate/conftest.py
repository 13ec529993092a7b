"""Shared by the sampler's tests: a tiny random model over the world vocabulary, and small helpers, as fixtures."""
from __future__ import annotations

import pytest
import torch

from unified_lm.generate.sampling import SamplingConfig
from unified_lm.generate.segments import Prompt
from unified_lm.model.config import preset
from unified_lm.model.transformer import UnifiedTransformer


@pytest.fixture(scope="module")
def vocab(lm_data):
    return lm_data.vocab


@pytest.fixture(scope="session")
def grid() -> tuple[int, int]:
    """The picture grid the sampler draws (the lm_data store's codes are 4x4)."""
    return (4, 4)


@pytest.fixture(scope="session")
def world_prompts() -> list[Prompt]:
    return [Prompt(["a red circle at the top left."]),
            Prompt(["a small blue square and a large green cross on the right."]), Prompt(["Step 1:"])]


@pytest.fixture(scope="session")
def tiny_lm():
    """`tiny_lm(vocab, seed=0, max_seq_len=160)`: a seeded, untrained `tiny` model in eval mode."""
    def tiny_lm(vocab, seed: int = 0, max_seq_len: int = 160) -> UnifiedTransformer:
        config = preset("tiny").model
        config.vocab_size, config.max_seq_len = vocab.size, max_seq_len
        torch.manual_seed(seed)
        return UnifiedTransformer(config).eval()
    return tiny_lm


@pytest.fixture(scope="session")
def boost():
    """`boost(token, amount)`: a logits processor adding `amount` to one token's logit."""
    def boost(token: int, amount: float):
        def processor(logits):
            logits = logits.clone()
            logits[:, token] += amount
            return logits
        return processor
    return boost


@pytest.fixture(scope="session")
def config():
    """`config(**changes)`: SamplingConfig.from_dict(changes)."""
    def config(**changes) -> SamplingConfig:
        return SamplingConfig.from_dict(changes)
    return config


@pytest.fixture(scope="session")
def check_structure():
    def check_structure(tokens: list[int], vocab, grid_tokens: int, max_images: int, starts_in_image: bool = False) -> int:
        """Walk the generated ids through the state machine; returns the number of pictures."""
        special = vocab.special
        in_image, filled, pictures = starts_in_image, 0, int(starts_in_image)
        for token in tokens:
            if in_image:
                if filled < grid_tokens:
                    assert vocab.is_image(token), f"non-image id {token} inside a picture"
                    filled += 1
                else:
                    assert token == special.eoi, "a picture must end with <eoi> after exactly grid-many codes"
                    in_image = False
            else:
                assert not vocab.is_image(token), f"image id {token} emitted in text mode"
                assert token != special.eoi and token not in (special.bos, special.pad, special.image, 0)
                assert 0 < token < vocab.text_size or token in (special.eos, special.boi)
                if token == special.boi:
                    in_image, filled = True, 0
                    pictures += 1
        assert pictures <= max_images
        return pictures
    return check_structure
