"""A small causal LM built locally, for the smoke run, tests and benchmarks (no download).

The tokenizer is a byte-level BPE trained on the given preference data with a ChatML chat template;
the model is a randomly initialised Llama of the requested size, saved with `save_pretrained`.

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
) -> Path:
    """Save a tokenizer and a randomly initialised Llama to `output_dir`; returns the path."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    output_dir = Path(output_dir)
    if (output_dir / "config.json").exists():
        return output_dir
    data_files = data_files or sorted(sample_data_dir().glob("dpo_*_demo.json"))
    tokenizer = build_tokenizer(data_files, vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
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
