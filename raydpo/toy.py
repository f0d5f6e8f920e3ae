"""A small causal LM built locally, for the smoke run, tests and benchmarks (no download).

The tokenizer is a byte-level BPE trained on the given preference data with a ChatML chat template;
the model is a randomly initialised Llama of the requested size (or a GPT-2 with dropout,
`architecture="gpt2"`), saved with `save_pretrained`.

    python -m raydpo.toy /tmp/toy-model --hidden-size 512 --layers 4
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def sample_data_dir() -> Path:
    """The real sample preference data shipped with the package (see its SOURCE.md)."""
    return Path(__file__).resolve().parent / "sample_data"


def _texts(files: Sequence[Path]) -> Iterator[str]:
    for path in files:
        for row in json.loads(Path(path).read_text(encoding="utf-8")):
            for turn in row.get("conversations", []):
                yield turn["value"]
            for key in ("chosen", "rejected"):
                yield row[key]["value"]


def build_tokenizer(files: Sequence[Path], vocab_size: int = 8000):
    """Train a byte-level BPE tokenizer on the data files and wrap it with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_texts(files), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
    )


ARCHITECTURES = ("llama", "gpt2")


def build_toy_model(
    output_dir: str | Path,
    data_files: Sequence[Path] | None = None,
    vocab_size: int = 8000,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 8192,
    seed: int = 0,
    architecture: str = "llama",
    dropout: float = 0.0,
) -> Path:
    """Save a tokenizer and a randomly initialised model to `output_dir`; returns the path.

    `llama` (no dropout, untied head) or `gpt2`, shaped as published: tied embeddings and
    `resid_pdrop` = `embd_pdrop` = `attn_pdrop` = `dropout` (0.1 in GPT-2's own config)."""
    import transformers

    if architecture == "llama":
        config_class, model_class = transformers.LlamaConfig, transformers.LlamaForCausalLM
        config = {"hidden_size": hidden_size, "intermediate_size": intermediate_size or 2 * hidden_size}
        config |= {"num_hidden_layers": num_layers, "max_position_embeddings": max_position_embeddings}
        config |= {
            "num_attention_heads": num_heads,
            "num_key_value_heads": num_heads,
            "attention_dropout": dropout,
        }
        config |= {"bos_token_id": None, "tie_word_embeddings": False}
    elif architecture == "gpt2":
        config_class, model_class = transformers.GPT2Config, transformers.GPT2LMHeadModel
        config = {"n_embd": hidden_size, "n_layer": num_layers, "n_head": num_heads}
        config |= {"n_positions": max_position_embeddings, "bos_token_id": "eos"}
        config |= dict.fromkeys(("resid_pdrop", "embd_pdrop", "attn_pdrop"), dropout)
    else:
        raise ValueError(f"architecture must be one of {', '.join(ARCHITECTURES)}, got {architecture!r}")
    return _build(output_dir, data_files, vocab_size, seed, config_class, model_class, config)


def _build(
    output_dir: str | Path,
    data_files: Sequence[Path] | None,
    vocab_size: int,
    seed: int,
    config_class,
    model_class,
    config: dict,
) -> Path:
    """Train the tokenizer, build `model_class(config_class(**config))` with the tokenizer's vocabulary
    and special ids and a fixed seed, and save both; the directory appears whole. An existing model
    directory is returned as it is."""
    import torch

    output_dir = Path(output_dir)
    if (output_dir / "config.json").exists():
        return output_dir
    tokenizer = build_tokenizer(data_files or sorted(sample_data_dir().glob("dpo_*_demo.json")), vocab_size)
    special = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    if config.get("bos_token_id") == "eos":
        config = {**config, "bos_token_id": tokenizer.eos_token_id}
    torch.manual_seed(seed)
    model = model_class(config_class(**config, vocab_size=len(tokenizer), **special))
    tmp = output_dir.with_name(output_dir.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(output_dir)
    return output_dir


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir")
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=8000)
    args = parser.parse_args(argv)
    path = build_toy_model(
        args.output_dir,
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        num_layers=args.layers,
        num_heads=args.heads,
    )
    print(path)


if __name__ == "__main__":
    main()
