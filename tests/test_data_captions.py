"""Caption rules: trigger, prefix / suffix, keep + shuffle, dropout rates, token limit, chunks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lora_train_ext.core.config import DataConfig
from lora_train_ext.core.data.captions import (CaptionRules, approx_token_count, chunk_caption,
                                               fit_token_limit, process_caption, split_tags,
                                               tag_counts)

BASE = "mychar, red hair, smile, outdoors, blue sky, tree"


@pytest.mark.parametrize("rules, base, expect", [
    (CaptionRules(), BASE, BASE),
    (CaptionRules(trigger_word="sks"), BASE, "sks, " + BASE),
    (CaptionRules(trigger_word="mychar"), "red hair, mychar", "mychar, red hair"),  # not doubled
    (CaptionRules(prefix="masterpiece"), "a, b", "masterpiece, a, b"),
    (CaptionRules(suffix="best quality"), "a, b", "a, b, best quality"),
    (CaptionRules(trigger_word="t", prefix="p", suffix="s"), "a", "t, p, a, s"),
    (CaptionRules(trigger_word="t"), "", "t"),
    (CaptionRules(), " a ,, b , ", "a, b"),
])
def test_fixed_rules(rules, base, expect):
    assert process_caption(base, rules, np.random.default_rng(0)) == expect
    assert process_caption(base, rules, None) == expect


@pytest.mark.parametrize("keep", [0, 1, 2, 3])
def test_shuffle_keeps_first_n(keep):
    rules = CaptionRules(shuffle=True, keep_tokens=keep, trigger_word="sks")
    tags = split_tags(BASE)
    seen = set()
    rng = np.random.default_rng(1)
    for _ in range(200):
        out = split_tags(process_caption(BASE, rules, rng))
        assert out[0] == "sks"
        assert out[1:1 + keep] == tags[:keep]
        assert sorted(out[1:]) == sorted(tags)
        seen.add(tuple(out))
    assert len(seen) >= min(20, math.factorial(len(tags) - keep))  # it does shuffle


def test_no_shuffle_without_flag():
    rng = np.random.default_rng(2)
    assert {process_caption(BASE, CaptionRules(keep_tokens=2), rng) for _ in range(50)} == {BASE}


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.5, 1.0])
def test_caption_dropout_rate(rate):
    rules = CaptionRules(caption_dropout=rate, trigger_word="sks", prefix="p")
    rng = np.random.default_rng(3)
    n = 4000
    empty = sum(process_caption(BASE, rules, rng) == "" for _ in range(n))
    assert abs(empty / n - rate) < 0.03


@pytest.mark.parametrize("rate, keep", [(0.2, 0), (0.5, 2), (1.0, 1)])
def test_tag_dropout_rate_spares_kept_tags(rate, keep):
    rules = CaptionRules(tag_dropout=rate, keep_tokens=keep)
    tags = split_tags(BASE)
    rng = np.random.default_rng(4)
    dropped = total = 0
    for _ in range(2000):
        out = split_tags(process_caption(BASE, rules, rng))
        assert out[:keep] == tags[:keep]
        total += len(tags) - keep
        dropped += len(tags) - len(out)
    assert abs(dropped / total - rate) < 0.03


def test_draws_repeat_with_the_seed():
    rules = CaptionRules(shuffle=True, tag_dropout=0.3, caption_dropout=0.2)
    a = [process_caption(BASE, rules, np.random.default_rng([5, i])) for i in range(50)]
    b = [process_caption(BASE, rules, np.random.default_rng([5, i])) for i in range(50)]
    assert a == b


@pytest.mark.parametrize("text, tokens", [
    ("", 0),
    ("cat", 1),
    ("red hair, smile", 4),         # red, hair, ",", smile
    ("1girl", 2),                   # digit + word
    ("2024", 4),                    # CLIP splits digits
    ("(masterpiece:1.2)", 8),       # CLIP: 7; the long word counts 2 here (over, not under)
    ("supercalifragilistic", 3),    # long rare word -> several pieces
])
def test_approx_token_count(text, tokens):
    assert approx_token_count(text) == tokens


@pytest.mark.parametrize("limit", [75, 150, 225])
def test_token_limit_drops_trailing_tags(limit):
    tags = [f"tag{i} word" for i in range(200)]  # each "tagN word" is 4 tokens (+1 comma)
    out = process_caption(", ".join(tags), CaptionRules(max_tokens=limit, trigger_word="sks"),
                          None)
    assert approx_token_count(out) <= limit
    assert approx_token_count(out) > limit - 6  # nothing more than one tag short of the limit
    assert split_tags(out)[0] == "sks" and split_tags(out)[1:] == tags[:len(split_tags(out)) - 1]


def test_token_limit_with_pluggable_counter():
    count_words = lambda s: len(s.replace(",", " ").split())  # noqa: E731
    out = process_caption("a, b, c, d, e", CaptionRules(max_tokens=3, keep_tokens=1,
                                                        suffix="z"), None, count_words)
    assert out == "a, b, z"


def test_token_limit_cuts_words_when_fixed_parts_are_too_long():
    out = fit_token_limit(["one two three four five six"], ["x"], [], 3)
    assert out == "one two three"


def test_chunk_caption_splits_at_tags():
    tags = [f"word{i} other" for i in range(60)]
    caption = ", ".join(tags)
    chunks = chunk_caption(caption, 75)
    assert len(chunks) >= 3
    assert all(approx_token_count(c) <= 75 for c in chunks)
    assert sum((split_tags(c) for c in chunks), []) == tags


def test_rules_from_config_and_tag_counts():
    cfg = DataConfig(trigger_word=" sks ", caption_prefix="p", shuffle_tags=True, keep_tokens=2,
                     caption_dropout=0.1, tag_dropout=0.2, max_token_length=150)
    rules = CaptionRules.from_config(cfg)
    assert (rules.trigger_word, rules.keep_tokens, rules.max_tokens) == ("sks", 2, 150)
    assert rules.is_random and not CaptionRules().is_random
    assert tag_counts(["a, b", "b, c, b", ""]) == {"a": 1, "b": 2, "c": 1}
