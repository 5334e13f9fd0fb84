"""target_modules regexes (issue 16, item 6): the same answers as re.fullmatch, and a
catastrophic-backtracking pattern from an adapter_config.json cannot hang a load."""

from __future__ import annotations

import json
import random
import re

import pytest

from shira_export import ShiraConfig, ShiraModel, get_shira_model
from shira_export.errors import ShiraInputError
from shira_export.tuner.patterns import PatternError, TargetPattern
from tiny_models import tiny_opt

PATTERNS = [
    r".*decoder.*(SelfAttention|EncDecAttention).*(q|v)$",
    r".*language_model\..*\.(q_proj|v_proj)",
    r"model\.layers\.\d+\.self_attn\.(q|k|v)_proj",
    r"^(?!.*vision).*(q_proj|v_proj)$",
    r".*(?<=attn)\.q_proj",
    r"\bq\b.*",
    r"[^.]+\.[a-z_]{2,5}",
    r"(?x) a b* c",
    r"a{2,3}b?",
    r".*\.q_proj\n?",
    r"(?s).*",
    r"x*?y+?",
    r"\W+",
    r"(?=.*q)(?=.*\d).*",
    r"[\w.]+_proj",
    r"(a|ab)(c|bcd)(d*)",
    r"\Aq\Z|\S\s?",
]
# Exponential for a backtracking matcher: compared with `re` on short names only.
EXPLOSIVE = [r"(.*.*)*x", r"(?:(?:a|b)*)*c", r"(a*)*$", r"(a|a)*b", r"(x+x+)+y"]
NAMES = [
    "model.decoder.layers.0.SelfAttention.q",
    "model.language_model.layers.3.self_attn.q_proj",
    "xx",
    "aaaa",
    "model.layers.12.self_attn.k_proj",
    "vision.q_proj",
    "text.q_proj",
    "attn.q_proj",
    "q.v",
    "a.bc",
    "abc",
    "abbbc",
    "aab",
    "aaab",
    "",
    "x",
    "y",
    ".q_proj\n",
    "ab.c",
    "q1",
    "a\n",
    "q",
    "abcd",
    "abcdd",
    "q_proj",
]


def _names(n: int = 300, longest: int = 9) -> list[str]:
    rnd = random.Random(0)
    return NAMES + ["".join(rnd.choice("abqxy._1 \n") for _ in range(rnd.randint(0, longest))) for _ in range(n)]


@pytest.mark.parametrize("pattern", PATTERNS + EXPLOSIVE)
def test_same_answers_as_re_fullmatch(pattern):
    ours = TargetPattern(pattern)
    short = pattern in EXPLOSIVE
    for name in _names():
        if short and len(name) > 12:
            continue
        assert ours.fullmatch(name) == (re.fullmatch(pattern, name) is not None), (pattern, name)


def test_explosive_patterns_answer_on_long_names():
    """re.fullmatch would take ~2^n steps here; the NFA takes n x states."""
    assert TargetPattern(r"(.*.*)*x").fullmatch("a" * 5000) is False
    assert TargetPattern(r"(.*.*)*x").fullmatch("a" * 5000 + "x") is True
    assert TargetPattern(r"(a|a)*b").fullmatch("a" * 3000) is False


@pytest.mark.parametrize(
    "pattern, reason",
    [
        (r"(a)\1", "backreferences"),
        (r"a*+", "possessive"),
        (r"(?>a)", "atomic"),
        (r"(?i)q_proj", "flags"),
        (r"(?<=a+)b", "fixed-width"),
        (r"(?:a{1000}){1000}", "states"),
        ("(" * 5000, "characters"),
        (r"(?P<x>a)(?(x)b)", "conditional"),
    ],
)
def test_refused_with_the_reason(pattern, reason):
    with pytest.raises(PatternError, match=reason):
        TargetPattern(pattern)
    with pytest.raises(ValueError, match=reason):
        ShiraConfig(target_modules=pattern)


def test_an_adapter_config_with_an_explosive_regex_loads_without_hanging(tmp_path):
    model = get_shira_model(tiny_opt(), ShiraConfig(r=1, target_modules=r".*(q|v)_proj"))
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    config = json.loads(path.read_text())
    config["target_modules"] = r"(.*.*)*x"  # matches no module: a clean input error, at once
    path.write_text(json.dumps(config))
    with pytest.raises(ShiraInputError, match="match no linear layer"):
        ShiraModel.from_pretrained(tiny_opt(), tmp_path)
    config["target_modules"] = r"(a)\1"
    path.write_text(json.dumps(config))
    with pytest.raises(ShiraInputError, match=r"adapter_config.json: invalid SHiRA config.*backreferences"):
        ShiraModel.from_pretrained(tiny_opt(), tmp_path)
    config["target_modules"] = r"(.*.*)*(q|v)_proj"  # explosive and matching: the same modules as before
    path.write_text(json.dumps(config))
    loaded = ShiraModel.from_pretrained(tiny_opt(), tmp_path)
    assert sorted(p for p, _ in loaded.shira_layers()) == sorted(p for p, _ in model.shira_layers())
