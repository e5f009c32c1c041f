"""convert(model, inplace=True): the twin holds the model's own weights, with no second copy (issue 29)."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from faithful_reference import reference_outputs

import cosconvert


def tiny_llama() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval()


def test_inplace_conversion_is_faithful_and_copies_no_weight():
    model = tiny_llama()
    kept = copy.deepcopy(model)  # the reference's original
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    converted = cosconvert.convert(model, inplace=True, gain="none", example_inputs=(ids,))
    weights = [p for name, p in converted.named_parameters() if not name.endswith("gain")]
    assert weights and all(p.untyped_storage().data_ptr() in storages for p in weights)
    assert converted.lm_head.weight is converted.model.embed_tokens.weight, "the tied head stays tied"
    assert "converted in place" in converted.cosine_report.checks["cosine check"]
    want = reference_outputs(kept, ids)[0].logits
    with torch.no_grad():
        got = converted(ids).logits
    assert float((got.double() - want).abs().max() / want.abs().max()) < 1e-5


def test_inplace_refuses_calibration_which_needs_the_original():
    with pytest.raises(ValueError, match="inplace=False"):
        cosconvert.convert(tiny_llama(), inplace=True, calibration_data=[torch.zeros(1, 4, dtype=torch.long)])
