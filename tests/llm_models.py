"""Tiny causal LMs saved as real Hugging Face directories, for the LLM tests.

Each directory holds config.json, safetensors weights and a byte-level BPE tokenizer
trained here (the ``tokenizers`` library) on BBC News text. The Llama and Qwen2
tokenizers carry a ChatML-style chat template whose end-of-turn token is EOS; GPT-2's has
none, so its runs exercise the named (alpaca) template. Built once per process.
"""

from __future__ import annotations

from pathlib import Path

FAMILIES = ("llama", "qwen2", "gpt2")
VOCAB = 512
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_BUILT: dict[tuple[str, str], Path] = {}
_TRAINED: dict[str, str] = {}


def train_tokenizer(chat: bool):
    """A byte-level BPE tokenizer trained on 300 BBC articles (about a second)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from fedlora.task.data import bbc_news

    if "bpe" not in _TRAINED:
        texts, _, _ = bbc_news()
        specials = ["<|pad|>", "<|bos|>", "<|im_end|>", "<|im_start|>"]
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        tok.train_from_iterator(texts[::7][:300], trainer)
        _TRAINED["bpe"] = tok.to_str()
    tok = Tokenizer.from_str(_TRAINED["bpe"])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>",
                                   bos_token="<|bos|>", eos_token="<|im_end|>")
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def _config(family: str, tokenizer):
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    ids = {"vocab_size": VOCAB, "bos_token_id": tokenizer.bos_token_id,
           "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    if family == "gpt2":
        return GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, **ids)
    cls = LlamaConfig if family == "llama" else Qwen2Config
    return cls(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               tie_word_embeddings=family == "qwen2", **ids)


def model_dir(family: str, root: Path) -> Path:
    """RUN root/<family>: a saved tiny model of ``family`` (built once per process)."""
    import torch
    from transformers import AutoModelForCausalLM

    key = (family, str(root))
    if key in _BUILT:
        return _BUILT[key]
    out = Path(root) / family
    if not (out / "config.json").is_file():
        tokenizer = train_tokenizer(chat=family != "gpt2")
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(_config(family, tokenizer))
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    _BUILT[key] = out
    return out


def model_cfg(path: Path, **extra) -> dict:
    """hf_local's model config for a directory (as conf/model/hf_local.yaml resolves)."""
    return {"name": "hf_local", "source": "path", "package": None, "path": str(path),
            "task": "causal_lm", "target_modules": ["auto"], "head_modules": ["auto"],
            "pooling": "pooler", "max_length": 96, "dtype": "auto",
            "gradient_checkpointing": False, "quantization": "none", "check_memory": True,
            **extra}
