"""A Hugging Face byte-level BPE tokenizer as a tiktoken encoding, when tiktoken can encode exactly like it.

tiktoken splits text with one regex, then merges the bytes of each piece, always the adjacent pair whose
concatenation has the lowest rank, a rank being the token id. `tokenizers` does the same when
  - the model is a BPE over the 256 byte-level symbols (no byte fallback, no dropout, no word prefix or
    suffix) whose merges yield token ids in increasing order (merge order = id order): exactly how tiktoken
    itself derives its gpt2 encoding from GPT-2's merge list;
  - no normalizer rewrites the text;
  - the pre-tokenizer is one of the known splits below, without an added prefix space;
  - the added tokens (matched in the text by both: `<|endoftext|>` written in a document becomes the EOS id,
    as packerd has always packed it with `tokenizers`) strip nothing around them and none contains another.
Anything else raises NotConvertible naming the first rule broken. The rules are necessary, not sufficient:
tiktoken joins any two adjacent pieces whose concatenation is a token, `tokenizers` only the pairs its merge
list names, and a merge list can leave out a split that tiktoken would take (tests/test_engines.py builds
one). Proving the absence of such a case would take the whole merge graph; so a conversion is checked on
text instead (packerd/tokenizer.py: probe text at start, then the guard on sampled batches).
"""
from __future__ import annotations

import json

# tiktoken's GPT-2 (r50k) pattern: what `tokenizers`' ByteLevel(use_regex=True) pre-tokenizer splits by
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Split(Regex) patterns as Llama-3 (cl100k's) and Qwen2 write them in tokenizer.json; both regex engines
# read them alike (tests/test_engines.py compares the two engines on adversarial text with each)
KNOWN_SPLIT_PATTERNS = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
)


class NotConvertible(ValueError):
    pass


def _byte_decoder() -> dict[str, int]:
    """The byte-level alphabet (GPT-2's bytes_to_unicode), character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(rest)}


def _pattern(pre: dict | None) -> str:
    """The tiktoken regex equivalent to the pre-tokenizer `pre` (tokenizer.json form)."""
    def byte_level(p: dict, with_regex: bool) -> bool:
        return (p.get("type") == "ByteLevel" and not p.get("add_prefix_space", False)
                and p.get("use_regex", True) == with_regex)
    if pre and byte_level(pre, True):
        return GPT2_PATTERN
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else []
    if len(steps) == 2 and steps[0].get("type") == "Split" and byte_level(steps[1], False):
        split = steps[0]
        regex = (split.get("pattern") or {}).get("Regex")
        if regex in KNOWN_SPLIT_PATTERNS and split.get("behavior") == "Isolated" and not split.get("invert"):
            return regex
    raise NotConvertible(f"pre-tokenizer {json.dumps(pre)[:120]} has no known tiktoken pattern")


def _ranks(model: dict, added_ids: set[int]) -> dict[bytes, int]:
    """Byte string -> id of every token the BPE can produce: the 256 bytes and the merge results."""
    if model.get("type") != "BPE":
        raise NotConvertible(f"model {model.get('type')} is not BPE")
    if model.get("byte_fallback") or model.get("dropout") or model.get("continuing_subword_prefix") \
            or model.get("end_of_word_suffix"):
        raise NotConvertible("BPE with byte fallback, dropout or a word prefix/suffix")
    vocab, alphabet = model["vocab"], _byte_decoder()
    ranks = {bytes([b]): vocab[c] for c, b in alphabet.items() if c in vocab}
    # symbol string -> bytes in C (str.translate, then latin-1); a character outside the alphabet becomes
    # U+FFFF, which latin-1 cannot encode
    table = {cp: 0xFFFF for cp in range(256)} | {ord(c): b for c, b in alphabet.items()}
    if len(ranks) < 256:
        raise NotConvertible("the vocabulary lacks some of the 256 byte-level symbols")
    last = -1
    for merge in model.get("merges", []):
        a, b = merge.split(" ") if isinstance(merge, str) else merge
        rank = vocab.get(a + b)
        if rank is None or rank < last:
            raise NotConvertible(f"merge {a!r} + {b!r} does not give token ids in merge order")
        try:
            ranks[(a + b).translate(table).encode("latin-1")] = last = rank
        except UnicodeEncodeError:
            raise NotConvertible(f"merge {a!r} + {b!r} is not byte-level") from None
    if model.get("ignore_merges") and len(ranks) < len(set(vocab.values()) - added_ids):
        # tokenizers then takes a whole piece found in the vocabulary, even one no merge gives
        raise NotConvertible("ignore_merges with tokens no merge produces")
    if added_ids & set(ranks.values()):
        raise NotConvertible("an added token is also a byte-level token")
    return ranks


def _specials(added: list[dict]) -> dict[str, int]:
    for t in added:
        if t.get("lstrip") or t.get("rstrip") or t.get("single_word"):
            raise NotConvertible(f"added token {t['content']!r} strips or matches whole words only")
    contents = [t["content"] for t in added]
    for c in contents:
        if any(c != o and c in o for o in contents):
            raise NotConvertible(f"added token {c!r} is part of another")
    return {t["content"]: t["id"] for t in added}


def to_tiktoken(tokenizer_json: str, name: str = "converted"):
    """(tiktoken.Encoding, its special tokens) equivalent to a tokenizer.json; NotConvertible if it can't be."""
    import tiktoken

    spec = json.loads(tokenizer_json)
    norm = spec.get("normalizer")
    if norm and not (norm.get("type") == "Sequence" and not norm.get("normalizers")):
        raise NotConvertible(f"normalizer {norm.get('type')} changes the text")
    pattern = _pattern(spec.get("pre_tokenizer"))
    specials = _specials(spec.get("added_tokens") or [])
    ranks = _ranks(spec.get("model") or {}, set(specials.values()))
    enc = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)
    return enc, frozenset(specials)
