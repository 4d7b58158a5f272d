"""Derive the CLIP BPE tokenizer files (vocab.json, merges.txt) from the BPE table that the
`clip-anytorch` / `open_clip_torch` wheels ship, without installing either package.

    pip download --no-deps clip-anytorch -d /tmp/clip
    python scripts/make_clip_tokenizer.py /tmp/clip/clip_anytorch-*.whl src/diffusers_spm/assets/concept_world/tokenizer

The vocabulary is built exactly as CLIP's own `SimpleTokenizer` builds it: the 256 byte-unicode
characters, the same with `</w>`, the merges (lines 1 to 48894) joined, then the two special
tokens: 49408 entries.
"""

import argparse
import gzip
import json
import zipfile
from pathlib import Path

from transformers.convert_slow_tokenizer import bytes_to_unicode

N_MERGES = 49152 - 256 - 2


def read_bpe_table(path: Path) -> list[str]:
    if path.suffix == ".whl":
        with zipfile.ZipFile(path) as wheel:
            name = next(n for n in wheel.namelist() if n.endswith("bpe_simple_vocab_16e6.txt.gz"))
            raw = wheel.read(name)
    else:
        raw = path.read_bytes()
    return gzip.decompress(raw).decode("utf-8").split("\n")[1 : N_MERGES + 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="a clip-anytorch/open_clip wheel or bpe_simple_vocab_16e6.txt.gz")
    parser.add_argument("output", type=Path)
    args = parser.parse_args()

    merges = read_bpe_table(args.source)
    base = list(bytes_to_unicode().values())
    tokens = base + [b + "</w>" for b in base] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    assert len(tokens) == 49408, len(tokens)

    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (args.output / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    (args.output / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True, **special}
    (args.output / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


if __name__ == "__main__":
    main()
