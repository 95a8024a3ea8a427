"""LlamaCodeHead (the released MLLM's sub-code head, unitok.generation.heads): the teacher-forced pass is causal
and equals step-by-step decoding with its cache."""
import pytest
import torch

from head_checks import stepped_and_changed
from unitok.generation.heads import LlamaCodeHead


@pytest.mark.parametrize('attn', ['eager', 'sdpa'])
def test_teacher_forced_equals_cached_steps(attn):
    from transformers import LlamaConfig
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=64)
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    head = LlamaCodeHead(cfg, num_codebooks=4, codebook_size=16, depth=2).eval()
    h, codes = torch.randn(3, 32), torch.randint(0, 16, (3, 4))
    with torch.no_grad():
        full, stepped, again = stepped_and_changed(head, h, codes, 16)          # (3, 4, 16) each
        assert torch.allclose(full, stepped, atol=1e-5)
        # step k reads sub-codes 0..k-1 only: changing sub-code 1 leaves steps 0 and 1 as they were
        assert torch.allclose(again[:, :2], full[:, :2], atol=1e-6) and not torch.allclose(again[:, 2:], full[:, 2:])
