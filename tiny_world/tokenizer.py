"""A CLIP BPE tokenizer (vocab.json + merges.txt) learned offline from the world's captions.

The merges are learned with the `tokenizers` BPE trainer in CLIP's word convention (lower case,
whitespace words, "</w>" on the last symbol), so every caption word becomes one token, and any other
text still tokenizes through the single-character fallback.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import CLIPTokenizer

from lcm_lora.world.scene import all_scenes

SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
MAX_LENGTH = 77  # Stable Diffusion's CLIP context length


def _byte_symbols() -> list[str]:
    # GPT-2 / CLIP's reversible map from bytes to printable unicode characters.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def learn_clip_tokenizer(out_dir: str | Path) -> CLIPTokenizer:
    """Write vocab.json and merges.txt to `out_dir` and return the loaded CLIPTokenizer."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(vocab_size=10_000, end_of_word_suffix="</w>", show_progress=False)
    bpe.train_from_iterator([scene.caption for scene in all_scenes()], trainer)
    merges = json.loads(bpe.to_str())["model"]["merges"]
    merges = [m.split(" ") if isinstance(m, str) else m for m in merges]

    symbols = _byte_symbols()
    vocab_list = symbols + [s + "</w>" for s in symbols]
    vocab_list += ["".join(pair) for pair in merges] + list(SPECIAL_TOKENS)
    vocab = {token: i for i, token in enumerate(dict.fromkeys(vocab_list))}
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    lines = ["#version: 0.2"] + [" ".join(pair) for pair in merges]
    (out_dir / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    tokenizer = CLIPTokenizer(
        str(out_dir / "vocab.json"), str(out_dir / "merges.txt"), model_max_length=MAX_LENGTH
    )
    tokenizer.save_pretrained(out_dir)
    return tokenizer
