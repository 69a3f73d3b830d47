#!/usr/bin/env python
"""Generate the CLIP BPE tokenizer files (vocab.json + merges.txt) that transformers' CLIPTokenizer reads.

Source: the BPE merge list that ships (MIT licence, OpenAI CLIP) inside the open-clip-torch wheel as
`open_clip/bpe_simple_vocab_16e6.txt.gz`. The vocabulary is derived exactly as OpenAI's
`simple_tokenizer.py` does: 256 byte symbols, the same with `</w>`, one token per merge (48,894),
then `<|startoftext|>` (49406) and `<|endoftext|>` (49407): 49,408 tokens.

Usage:
    pip install open-clip-torch --no-deps        # only to read its bundled .txt.gz
    python tools/make_clip_tokenizer.py [--bpe PATH] [--out lora_train/configs/clip_tokenizer]

Check: "a photo of a cat" -> 49406 320 1125 539 320 2368 49407.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lora_train.models.tiny import _bytes_to_unicode  # noqa: E402  (the same byte table the tiny tokenizer uses)

N_MERGES = 49152 - 256 - 2  # 48,894, as in OpenAI's simple_tokenizer.py

TOKENIZER_CONFIG = {
    "model_max_length": 77, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "tokenizer_class": "CLIPTokenizer",
    "do_lower_case": True, "errors": "replace", "add_prefix_space": False,
}


def find_bpe() -> str:
    try:
        import importlib.util

        spec = importlib.util.find_spec("open_clip")
    except Exception:  # pragma: no cover
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("open_clip is not installed: `pip install open-clip-torch --no-deps`, or pass --bpe PATH "
                         "to bpe_simple_vocab_16e6.txt.gz")
    return os.path.join(list(spec.submodule_search_locations)[0], "bpe_simple_vocab_16e6.txt.gz")


def build(bpe_path: str):
    with gzip.open(bpe_path) as fh:
        lines = fh.read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:N_MERGES + 1]]
    if len(merges) != N_MERGES or any(len(m) != 2 for m in merges):
        raise SystemExit(f"{bpe_path}: unexpected merge list ({len(merges)} merges)")
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}, merges


def write(out: str, vocab, merges) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "vocab.json"), "w", encoding="utf-8", newline="\n") as fh:
        json.dump(vocab, fh, ensure_ascii=False, separators=(",", ":"))
    with open(os.path.join(out, "merges.txt"), "w", encoding="utf-8", newline="\n") as fh:
        fh.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    with open(os.path.join(out, "tokenizer_config.json"), "w", encoding="utf-8", newline="\n") as fh:
        json.dump(TOKENIZER_CONFIG, fh, indent=1)
        fh.write("\n")
    with open(os.path.join(out, "special_tokens_map.json"), "w", encoding="utf-8", newline="\n") as fh:
        json.dump({k: TOKENIZER_CONFIG[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}, fh, indent=1)
        fh.write("\n")


def main(argv=None) -> int:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bpe", default=None, help="path of bpe_simple_vocab_16e6.txt.gz (default: open_clip's)")
    ap.add_argument("--out", default=os.path.join(here, "lora_train", "configs", "clip_tokenizer"))
    args = ap.parse_args(argv)
    vocab, merges = build(args.bpe or find_bpe())
    assert len(vocab) == 49408 and vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    write(args.out, vocab, merges)
    print(f"wrote {len(vocab)} tokens, {len(merges)} merges to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
