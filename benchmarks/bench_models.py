"""The models and batches the speed benchmarks measure (benchmarks/speed.py, benchmarks/et_training.py)."""

from __future__ import annotations

CONFIGS = {
    # prge.testing.tiny_model("llama"): 2 layers, hidden 64, vocab ~500
    "tiny": {"kind": "tiny", "T": 64},
    # the notes' 21M Llama: hidden 512, 4 layers, vocab 8192
    "small": {"kind": "llama", "T": 128, "hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 4,
              "num_attention_heads": 8, "num_key_value_heads": 8, "vocab_size": 8192},
    "smollm2": {"kind": "builtin", "name": "smollm2-135m", "T": 128},
}


def build(name: str, rank: int):
    """(model with MP-LoRA, tokenizer, label_ids)."""
    import torch

    from prge.zo.lora import add_lora
    from prge.testing import tiny_model, tiny_tokenizer

    spec = CONFIGS[name]
    if spec["kind"] == "tiny":
        model, tok = tiny_model("llama")
    elif spec["kind"] == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        tok = tiny_tokenizer()
        cfg = LlamaConfig(**{k: v for k, v in spec.items() if k not in ("kind", "T")}, max_position_embeddings=512,
                          tie_word_embeddings=True, use_cache=False, pad_token_id=None, bos_token_id=None,
                          eos_token_id=tok.eos_token_id)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = LlamaForCausalLM._from_config(cfg, attn_implementation="eager", dtype=torch.float32).eval()
    else:
        from prge.models.load import load_model

        model, tok = load_model(spec["name"])
    add_lora(model, rank=rank, alpha=2.0 * rank, seed=0)
    label_ids = torch.tensor([5, 7])
    return model, tok, label_ids


def batch(name: str, b: int, vocab: int):
    import torch

    from prge.data.batch import Batch

    T = CONFIGS[name]["T"]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (b, T), generator=g)
    pos = torch.full((b, 1), T - 2, dtype=torch.long)
    return Batch(ids, pos, ids[:, T - 1:].clone(), torch.ones(b, 1), torch.randint(0, 2, (b,), generator=g))
