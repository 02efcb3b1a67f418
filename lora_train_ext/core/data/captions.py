"""Caption rules: trigger word, prefix / suffix, tag shuffling with kept leading tags, caption and
tag dropout, and the token limit.

Order of operations for one draw (matches kohya's behaviour where it is defined):
  1. caption dropout: with probability `caption_dropout` the whole caption is "" (the sample
     trains unconditionally, trigger and prefix included);
  2. the caption is split into tags at commas; the first `keep_tokens` tags stay in place;
  3. tag dropout removes each remaining tag with probability `tag_dropout`;
  4. shuffling permutes the remaining tags;
  5. the result is `trigger, prefix, kept tags, other tags, suffix` (the trigger word is not
     repeated when the caption already has it as a tag: it is moved to the front instead);
  6. the token limit drops trailing non-kept tags until the caption fits, then cuts words.

Tokens are counted by a pluggable `count_tokens(text) -> int`. The default, `approx_token_count`,
approximates CLIP's BPE without its vocabulary (which core does not ship): every word is one
token plus one per 7 further letters (rare long words split into several pieces), every digit is
one token, every punctuation mark is one token. It slightly over-counts common long words, so a
caption it accepts fits the real limit in practice. A trainer holding the real tokenizer passes
`lambda s: len(tokenizer(s).input_ids) - 2` instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import numpy as np

CountTokens = Callable[[str], int]

_WORD = re.compile(r"[^\W\d_]+|\d|[^\w\s]|_", re.UNICODE)


def approx_token_count(text: str) -> int:
    """Approximate number of CLIP tokens in `text` (without the start / end tokens)."""
    count = 0
    for piece in _WORD.findall(text.lower()):
        if piece[0].isalpha():
            count += 1 + (len(piece) - 1) // 7
        else:
            count += 1
    return count


def split_tags(caption: str, separator: str = ",") -> list[str]:
    """'a, b ,, c' -> ['a', 'b', 'c'] (blank tags dropped, whitespace trimmed)."""
    return [t.strip() for t in caption.split(separator) if t.strip()]


def join_tags(tags: list[str], separator: str = ",") -> str:
    return (separator + " ").join(t for t in tags if t)


@dataclass(frozen=True)
class CaptionRules:
    trigger_word: str = ""
    prefix: str = ""
    suffix: str = ""
    shuffle: bool = False
    keep_tokens: int = 0
    caption_dropout: float = 0.0
    tag_dropout: float = 0.0
    max_tokens: int = 75
    separator: str = ","

    @classmethod
    def from_config(cls, cfg) -> "CaptionRules":
        return cls(trigger_word=cfg.trigger_word.strip(), prefix=cfg.caption_prefix.strip(),
                   suffix=cfg.caption_suffix.strip(), shuffle=bool(cfg.shuffle_tags),
                   keep_tokens=int(cfg.keep_tokens), caption_dropout=float(cfg.caption_dropout),
                   tag_dropout=float(cfg.tag_dropout), max_tokens=int(cfg.max_token_length))

    @property
    def is_random(self) -> bool:
        return self.shuffle or self.caption_dropout > 0 or self.tag_dropout > 0


def process_caption(base: str, rules: CaptionRules, rng: np.random.Generator | None = None,
                    count_tokens: CountTokens = approx_token_count) -> str:
    """One draw of the caption a sample trains with. rng=None: no randomness (dropout off,
    no shuffle), which is what a text-encoder cache or a preview wants."""
    if rng is not None and rules.caption_dropout > 0 and rng.random() < rules.caption_dropout:
        return ""
    tags = split_tags(base, rules.separator)
    trigger = rules.trigger_word
    if trigger:
        tags = [t for t in tags if t != trigger]
    keep = max(0, rules.keep_tokens)
    head, tail = tags[:keep], tags[keep:]
    if rng is not None and rules.tag_dropout > 0 and tail:
        draws = rng.random(len(tail))
        tail = [t for t, d in zip(tail, draws) if d >= rules.tag_dropout]
    if rng is not None and rules.shuffle and len(tail) > 1:
        tail = [tail[i] for i in rng.permutation(len(tail))]
    fixed_front = [p for p in (trigger, rules.prefix) if p] + head
    fixed_back = [rules.suffix] if rules.suffix else []
    return fit_token_limit(fixed_front, tail, fixed_back, rules.max_tokens, count_tokens,
                           rules.separator)


def fit_token_limit(front: list[str], tail: list[str], back: list[str], max_tokens: int,
                    count_tokens: CountTokens = approx_token_count, separator: str = ",") -> str:
    """Join front + tail + back; drop tail tags from the end until it fits `max_tokens`, then
    cut whole words from the end if the fixed parts alone are too long."""
    tail = list(tail)
    text = join_tags(front + tail + back, separator)
    if max_tokens <= 0 or count_tokens(text) <= max_tokens:
        return text
    while tail:
        tail.pop()
        text = join_tags(front + tail + back, separator)
        if count_tokens(text) <= max_tokens:
            return text
    words = text.split(" ")
    lo, hi = 0, len(words)  # largest prefix of words that fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count_tokens(" ".join(words[:mid])) <= max_tokens:
            lo = mid
        else:
            hi = mid - 1
    return " ".join(words[:lo]).rstrip(" " + separator)


def chunk_caption(caption: str, chunk_tokens: int = 75,
                  count_tokens: CountTokens = approx_token_count, separator: str = ",",
                  ) -> list[str]:
    """Split a long caption into pieces of at most `chunk_tokens` tokens at tag boundaries, the
    way the WebUI splits long prompts into 75-token chunks (a single over-long tag is cut by
    words). A trainer with max_token_length 150/225 encodes each chunk and concatenates."""
    chunks: list[str] = []
    current: list[str] = []
    for tag in split_tags(caption, separator):
        candidate = join_tags(current + [tag], separator)
        if current and count_tokens(candidate) > chunk_tokens:
            chunks.append(join_tags(current, separator))
            current = []
        if count_tokens(tag) > chunk_tokens:
            words = tag.split(" ")
            piece: list[str] = []
            for word in words:
                if piece and count_tokens(" ".join(piece + [word])) > chunk_tokens:
                    chunks.append(" ".join(piece))
                    piece = []
                piece.append(word)
            current = [" ".join(piece)] if piece else []
            continue
        current.append(tag)
    if current:
        chunks.append(join_tags(current, separator))
    return chunks or [""]


def tag_counts(captions: list[str], separator: str = ",") -> dict[str, int]:
    """tag -> number of captions it appears in (for `ss_tag_frequency`)."""
    out: dict[str, int] = {}
    for caption in captions:
        for tag in dict.fromkeys(split_tags(caption, separator)):
            out[tag] = out.get(tag, 0) + 1
    return out
