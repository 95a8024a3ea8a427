"""A tiny randomly initialised Llama with a small byte-level BPE tokenizer and a ChatML template,
built in well under a second: for tests and benchmarks of the MLLM machinery without a download."""
from __future__ import annotations

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

_CORPUS = ["What is this emoji? It is an emoji of a grinning face.", "Draw an emoji of a red apple.",
           "The capital of France is Paris.", "a cat, a dog, a house, a tree, a car, the sun and the moon",
           "smileys & emotion, animals & nature, food & drink, travel & places, activities, objects, symbols, flags"]


def tiny_tokenizer(vocab_size: int = 384):
    """A byte-level BPE tokenizer (``transformers.PreTrainedTokenizerFast``) with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=['<|endoftext|>', '<|im_start|>', '<|im_end|>'],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token='<|im_start|>', eos_token='<|im_end|>',
                                   pad_token='<|endoftext|>')
    fast.chat_template = CHATML
    return fast


def tiny_llm(hidden: int = 32, layers: int = 2, heads: int = 4, max_positions: int = 256, seed: int = 0,
             vocab_size: int = 384):
    """``(model, tokenizer)``: a random ``LlamaForCausalLM`` sized for the tokenizer, float32, eval mode."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    tokenizer = tiny_tokenizer(vocab_size)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads // 2,
                      max_position_embeddings=max_positions, tie_word_embeddings=True,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval(), tokenizer
