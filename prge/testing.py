"""Tiny random models and a tiny tokenizer, so tests run in seconds with no downloads.

The real model (SmolLM2-135M) takes a minute to fetch and a few seconds per forward pass on a CPU;
almost nothing in prge depends on the weights being *trained*, only on the shapes, the tokenizer
behaviour (label words as single tokens, no BOS, a pad token, a chat template) and the
architecture family. So the tests use a byte-level BPE tokenizer trained in memory on a few
hundred words, and 2-layer models with random weights from the same Hugging Face classes the real
models use (Llama for SmolLM2, Gemma3, Qwen2, Qwen3, Phi-3, OPT, GPT-2).
"""

from __future__ import annotations

import os

import torch

EOS = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [EOS, IM_START, IM_END]

# Label words of the built-in tasks. Each must be ONE token with its leading space, as in SmolLM2.
LABEL_WORDS = [" great", " terrible", " Yes", " No", " positive", " negative"]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Sentiment reviews, NLI pairs and a little plain prose: enough for the usual words to be merged.
_CORPUS = """\
This movie was great. It was great. The acting was wonderful and the story was moving.
This movie was terrible. It was terrible. The plot was boring and the ending made no sense.
A great film with a great cast. I loved every minute of it, a truly good and fun movie.
A terrible film with a terrible script. I hated it, a bad and dull waste of time.
The review is positive. The review is negative. Sentiment: positive. Sentiment: negative.
Is the sentiment of this review positive or negative? The answer is positive.
Is the sentiment of this review positive or negative? The answer is negative.
Premise: A man is playing a guitar on the street. Hypothesis: A person is making music.
Does the premise entail the hypothesis? Yes or No? Answer: Yes.
Premise: A woman is reading a book in the park. Hypothesis: The woman is sleeping at home.
Does the premise entail the hypothesis? Yes or No? Answer: No.
Question: Is the sky blue on a clear day? Answer: Yes. Question: Can a fish fly? Answer: No.
The capital of France is Paris. The capital of Italy is Rome. The capital of Spain is Madrid.
The quick brown fox jumps over the lazy dog. The dog was not amused, but the fox was happy.
We train the model on a few examples and then evaluate it on the test set to see how well it does.
The weather today is sunny and warm, so we will go for a walk by the river after lunch.
She said that the book was better than the movie, and he agreed with her after reading it.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 2024. Punctuation: , . ! ? : ; ' " ( ) - and a new line.
"""


def _corpus_lines() -> list[str]:
    # The label words, repeated so BPE merges each of them into one token with its leading space.
    label_lines = [f"It was{w}." for w in LABEL_WORDS for _ in range(40)]
    return _CORPUS.splitlines() * 3 + label_lines


_TOKENIZER_JSON: str | None = None  # trained once per process; each call gets a fresh wrapper


def _train_tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=SPECIAL_TOKENS,  # ids 0, 1, 2
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is encodable
        show_progress=False,
    )
    tok.train_from_iterator(_corpus_lines(), trainer=trainer)
    return tok.to_str()


def tiny_tokenizer():
    """A ~500-token byte-level BPE tokenizer shaped like SmolLM2's: eos = pad = <|endoftext|>, no BOS.

    A fresh object per call (cheap: the trained vocabulary is cached) so that a test that changes
    e.g. `padding_side` does not leak into the next one.
    """
    global _TOKENIZER_JSON
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    if _TOKENIZER_JSON is None:
        _TOKENIZER_JSON = _train_tokenizer_json()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_TOKENIZER_JSON),
        eos_token=EOS,
        pad_token=EOS,
        additional_special_tokens=[IM_START, IM_END],
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


ARCHS = ("llama", "qwen2", "qwen3", "gemma3", "phi3", "opt", "gpt2")


def _config(arch: str, vocab_size: int, eos_id: int):
    """A 2-layer config of the family. Dropout is 0: zeroth-order training needs the same loss for
    the same weights, even if someone calls model.train()."""
    # pad_token_id stays None: with a padding_idx the embedding row of <|endoftext|> would start at zero
    # and, tied to the LM head, pin its logit at exactly 0. The tokenizer pads with eos by itself.
    common = dict(vocab_size=vocab_size, eos_token_id=eos_id, pad_token_id=None, bos_token_id=None, use_cache=False)
    if arch == "llama":
        from transformers import LlamaConfig

        # GQA and tied embeddings, like SmolLM2 (9 heads over 3 key/value heads)
        return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, **common)
    if arch == "qwen2":
        from transformers import Qwen2Config

        return Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, **common)
    if arch == "qwen3":
        from transformers import Qwen3Config

        # q/k RMS norms and no q/k/v biases (Qwen2 has them)
        return Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16, max_position_embeddings=256, tie_word_embeddings=True,
                           **common)
    if arch == "phi3":
        from transformers import Phi3Config

        # fused qkv_proj and gate_up_proj; an untied LM head, like Phi-3-mini
        return Phi3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=256, original_max_position_embeddings=256,
                          resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0, tie_word_embeddings=False, **common)
    if arch == "gemma3":
        from transformers import Gemma3TextConfig

        # one sliding-window layer and one global layer, like Gemma-3's 5:1 pattern in miniature
        return Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, sliding_window=16,
                                layer_types=["sliding_attention", "full_attention"], max_position_embeddings=256,
                                **common)
    if arch == "opt":
        from transformers import OPTConfig

        return OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                         word_embed_proj_dim=64, max_position_embeddings=256, dropout=0.0, attention_dropout=0.0,
                         activation_dropout=0.0, layerdrop=0.0, **common)
    if arch == "gpt2":
        from transformers import GPT2Config

        return GPT2Config(n_embd=64, n_inner=128, n_layer=2, n_head=4, n_positions=256, resid_pdrop=0.0,
                          embd_pdrop=0.0, attn_pdrop=0.0, **common)
    raise ValueError(f"unknown tiny arch {arch!r}; choose from {ARCHS}")


def tiny_model(arch: str = "llama", seed: int = 0, vocab_size: int | None = None):
    """(model, tokenizer): a randomly initialised 2-layer causal LM, fp32, eval mode, eager attention.

    Same seed, same weights. The global torch RNG is left as it was, so building a model in a test
    does not shift the random numbers the code under test draws. `vocab_size` defaults to the
    tokenizer's size; a larger one mimics real models whose embedding is padded past the vocabulary.
    """
    from transformers import AutoModelForCausalLM

    tok = tiny_tokenizer()
    config = _config(arch, vocab_size or len(tok), tok.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    model.config.use_cache = False
    model.eval()
    return model, tok


def save_tiny(path: str | os.PathLike, arch: str = "llama", seed: int = 0) -> str:
    """Save a tiny model and its tokenizer to `path`: what tests use as "a local model folder"."""
    model, tok = tiny_model(arch, seed)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def peft_label_logits(model_dir: str | os.PathLike, adapter: str | os.PathLike, batch, label_ids: torch.Tensor) -> torch.Tensor:
    """The label words' logits at each row's answer position from `peft.PeftModel.from_pretrained` of the
    base model in `model_dir` with `adapter`: what PEFT users get from an adapter prge wrote."""
    import warnings

    import peft
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(base, adapter).eval()
    with torch.no_grad():
        full = pm(input_ids=batch.input_ids).logits
    pos = batch.target_pos[:, 0]
    return full[torch.arange(len(pos)), pos][:, label_ids]
