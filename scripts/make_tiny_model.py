"""Write small, seeded, random-weight HF models with real trained tokenizers, for offline tests.

Importable (via importlib from this path) and runnable:
``python scripts/make_tiny_model.py {t5,bert,bert-cls,bert-mlm,llama} DEST --seed 0``.
Same kind + seed gives byte-identical files, so tests can rely on exact outputs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

KINDS = ("t5", "bert", "bert-cls", "bert-mlm", "llama", "gpt2")

CORPUS = """\
The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is Rome.
Paris is a large city on the river Seine, and many people visit it every year.
The quick brown fox jumps over the lazy dog. A lazy dog sleeps in the warm sun.
Machine learning models turn text into numbers, and numbers back into text.
Translate English to German: the house is wonderful. Das Haus ist wunderbar.
Summarize: the weather was cold and wet, so we stayed at home and read books all day.
What is the capital of Spain? Madrid is the capital of Spain.
I love this movie, it was great and fun. I hate this film, it was bad and boring.
The cat sat on the mat. The dog ran in the park. Birds sing in the morning.
Hello world! How are you today? I am fine, thank you very much.
Servers answer requests, batch inputs together, and return results in order.
One, two, three, four, five, six, seven, eight, nine, ten.
"""

LLAMA_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _corpus_lines() -> list[str]:
    return [line for line in CORPUS.splitlines() if line.strip()]


def _wordpiece_vocab(normalizer: Any, pre_tokenizer: Any, specials: list[str]) -> dict[str, int]:
    """Every corpus word plus every character (and its ## form), sorted: deterministic, unlike training."""
    words: set[str] = set()
    for line in _corpus_lines():
        words.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(line)))
    chars = {char for word in words for char in word}
    pieces = sorted(chars) + sorted(f"##{char}" for char in chars) + sorted(words - chars)
    return {token: index for index, token in enumerate(specials + pieces)}


def _wordpiece_tokenizer() -> Any:
    """BERT-style: lower-cased WordPiece with [CLS] ... [SEP] around each input."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    vocab = _wordpiece_vocab(normalizer, pre_tokenizer, specials)
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer, tok.decoder = normalizer, pre_tokenizer, decoders.WordPiece()
    tok.add_special_tokens(specials)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return tok


def _bpe_tokenizer(specials: list[str], template: str) -> Any:
    """Byte-level BPE (any text encodes, nothing is unknown) with a post-processing template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_corpus_lines(), trainer)
    used = [name for name in specials if name in template.split()]
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(name, tok.token_to_id(name)) for name in used]
    )
    return tok


def build_tokenizer(kind: str) -> Any:
    """A `PreTrainedTokenizerFast` for `kind`, trained on the built-in corpus (no network)."""
    from transformers import PreTrainedTokenizerFast

    if kind.startswith("bert"):
        return PreTrainedTokenizerFast(
            tokenizer_object=_wordpiece_tokenizer(),
            unk_token="[UNK]",
            pad_token="[PAD]",
            cls_token="[CLS]",
            sep_token="[SEP]",
            mask_token="[MASK]",
            model_max_length=128,
        )
    if kind == "t5":
        return PreTrainedTokenizerFast(
            tokenizer_object=_bpe_tokenizer(["<pad>", "</s>", "<unk>"], "$A </s>"),
            pad_token="<pad>",
            eos_token="</s>",
            unk_token="<unk>",
            model_max_length=128,
        )
    if kind == "llama":
        tok = PreTrainedTokenizerFast(
            tokenizer_object=_bpe_tokenizer(["<unk>", "<s>", "</s>"], "<s> $A"),
            bos_token="<s>",
            eos_token="</s>",
            unk_token="<unk>",
            model_max_length=256,
        )
        tok.chat_template = LLAMA_CHAT_TEMPLATE
        return tok
    if kind == "gpt2":  # a causal LM the native engine does not run: served by the HF generate engine
        tok = PreTrainedTokenizerFast(
            tokenizer_object=_bpe_tokenizer(["<|endoftext|>"], "$A"),
            bos_token="<|endoftext|>",
            eos_token="<|endoftext|>",
            unk_token="<|endoftext|>",
            model_max_length=128,
        )
        tok.chat_template = LLAMA_CHAT_TEMPLATE
        return tok
    raise ValueError(f"Unknown kind {kind!r}; choose one of {KINDS}")


def build_model(kind: str, tokenizer: Any) -> Any:
    """A randomly initialised model of `kind` sized for the given tokenizer."""
    import transformers as tf

    vocab = len(tokenizer)
    if kind == "t5":
        config = tf.T5Config(
            vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
            num_heads=4, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
        return tf.T5ForConditionalGeneration(config)
    if kind == "llama":
        config = tf.LlamaConfig(
            vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        )  # fmt: skip
        return tf.LlamaForCausalLM(config)
    if kind == "gpt2":
        config = tf.GPT2Config(
            vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=128,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        )  # fmt: skip
        return tf.GPT2LMHeadModel(config)
    config = tf.BertConfig(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
        id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1},
    )  # fmt: skip
    classes = {
        "bert": tf.BertModel,
        "bert-cls": tf.BertForSequenceClassification,
        "bert-mlm": tf.BertForMaskedLM,
    }
    if kind not in classes:
        raise ValueError(f"Unknown kind {kind!r}; choose one of {KINDS}")
    return classes[kind](config)


def make_tiny_model(kind: str, dest: str | Path, seed: int = 0) -> Path:
    """Write config.json, model.safetensors and the tokenizer files for `kind` into `dest`."""
    import torch

    if kind not in KINDS:
        raise ValueError(f"Unknown kind {kind!r}; choose one of {KINDS}")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(kind)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(kind, tokenizer)
    model.eval()
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


def write_sentence_transformers_files(
    dest: str | Path, pooling: str = "mean", normalize: bool = True
) -> None:
    """Add modules.json and 1_Pooling/config.json, making `dest` a sentence-transformers folder."""
    dest = Path(dest)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append(
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
        )
    (dest / "modules.json").write_text(json.dumps(modules, indent=2))
    (dest / "1_Pooling").mkdir(exist_ok=True)
    pooling_config = {
        "word_embedding_dimension": json.loads((dest / "config.json").read_text())["hidden_size"],
        "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean",
        "pooling_mode_max_tokens": pooling == "max",
    }
    (dest / "1_Pooling" / "config.json").write_text(json.dumps(pooling_config, indent=2))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("dest")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--sentence-transformers",
        choices=("mean", "cls", "max"),
        help="also write sentence-transformers pooling files with this mode (bert only)",
    )
    args = parser.parse_args(argv)
    dest = make_tiny_model(args.kind, args.dest, seed=args.seed)
    if args.sentence_transformers:
        write_sentence_transformers_files(dest, pooling=args.sentence_transformers)
    print(dest)


if __name__ == "__main__":
    main()
