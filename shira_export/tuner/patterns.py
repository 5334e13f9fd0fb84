"""`target_modules` regexes matched in time linear in the name, never by backtracking.

PEFT matches a string `target_modules` with `re.fullmatch(pattern, module_path)`. Python's
`re` backtracks, so a pattern from someone else's adapter_config.json such as
"(.*.*)*x" takes exponential time on a 30-character path (a hang, not an error). This
module gives the same yes/no answer as `re.fullmatch` without backtracking: Python's own
parser (`re._parser`, so the syntax is exactly `re`'s) turns the pattern into a tree,
the tree into a Thompson NFA, and a name is matched by advancing the set of live states
one character at a time (cost: characters x states, whatever the pattern). Sets seen
before are cached (a lazily built DFA), so matching every module of a model costs about
one dict lookup per character.

What an NFA cannot express is refused, with the reason: backreferences and conditionals,
possessive quantifiers and atomic groups (their language is not the greedy one), and
flags that change what characters match (IGNORECASE, MULTILINE, ASCII, LOCALE).
Lookaheads and fixed-width lookbehinds are supported (a nested NFA run from the
position). Patterns are capped at MAX_PATTERN_CHARS characters and MAX_STATES states
(a{1000}{1000} would be a million), so building is bounded too.
"""

from __future__ import annotations

import sys
from functools import lru_cache
from typing import Callable

if sys.version_info >= (3, 11):
    from re import _constants as _c
    from re import _parser as _p
else:  # pragma: no cover - Python 3.10
    import sre_constants as _c
    import sre_parse as _p

__all__ = ["MAX_PATTERN_CHARS", "MAX_STATES", "TargetPattern", "compile_target_pattern"]

MAX_PATTERN_CHARS = 4096
MAX_STATES = 20000
_CACHE_LIMIT = 50000
_CHAR, _SPLIT, _ASSERT, _MATCH = range(4)
_ALLOWED_FLAGS = _c.SRE_FLAG_UNICODE | _c.SRE_FLAG_VERBOSE | _c.SRE_FLAG_DOTALL
_REFUSED = {
    _c.GROUPREF: "backreferences",
    _c.GROUPREF_EXISTS: "conditional groups",
    getattr(_c, "POSSESSIVE_REPEAT", None): "possessive quantifiers",
    getattr(_c, "ATOMIC_GROUP", None): "atomic groups",
}


class PatternError(ValueError):
    """A target_modules regex this matcher cannot run safely (the message says why)."""


def _word(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


_CATEGORIES: dict = {
    _c.CATEGORY_DIGIT: str.isdecimal,
    _c.CATEGORY_NOT_DIGIT: lambda ch: not ch.isdecimal(),
    _c.CATEGORY_SPACE: str.isspace,
    _c.CATEGORY_NOT_SPACE: lambda ch: not ch.isspace(),
    _c.CATEGORY_WORD: _word,
    _c.CATEGORY_NOT_WORD: lambda ch: not _word(ch),
}


def _is_char(v: str) -> Callable[[str], bool]:
    return lambda ch: ch == v


def _is_not_char(v: str) -> Callable[[str], bool]:
    return lambda ch: ch != v


def _in_range(lo: int, hi: int) -> Callable[[str], bool]:
    return lambda ch: lo <= ord(ch) <= hi


def _set_predicate(items: list) -> Callable[[str], bool]:
    negate = False
    tests: list[Callable[[str], bool]] = []
    for op, av in items:
        if op is _c.NEGATE:
            negate = True
        elif op is _c.LITERAL:
            tests.append(_is_char(chr(av)))
        elif op is _c.RANGE:
            tests.append(_in_range(av[0], av[1]))
        elif op is _c.CATEGORY and av in _CATEGORIES:
            tests.append(_CATEGORIES[av])
        else:
            raise PatternError(f"character-set item {op} is not supported")
    return lambda ch: any(t(ch) for t in tests) != negate


class _Nfa:
    start: int  # the entry state, set by whoever builds the NFA (seq returns it)
    # Caches of run(), created on its first call: (states, char) -> states after the
    # step, and (states, anchor context) -> their closure.
    _steps: dict[tuple[frozenset[int], str], frozenset[int]]
    _closures: dict[tuple[frozenset[int], tuple[bool, ...]], frozenset[int]]

    def __init__(self, dotall: bool) -> None:
        self.kind: list[int] = []
        self.arg: list = []
        self.out: list[list[int]] = []
        self.dotall = dotall
        self.lookaround = False
        self.match = self._add(_MATCH, None, [])

    def _add(self, kind: int, arg, out: list[int]) -> int:
        if len(self.kind) >= MAX_STATES:
            raise PatternError(f"the pattern needs more than {MAX_STATES} states (bounded repeats too large)")
        self.kind.append(kind)
        self.arg.append(arg)
        self.out.append(out)
        return len(self.kind) - 1

    def seq(self, items, nxt: int) -> int:
        for op, av in reversed(list(items)):
            nxt = self.item(op, av, nxt)
        return nxt

    def item(self, op, av, nxt: int) -> int:
        if op in _REFUSED:
            raise PatternError(f"{_REFUSED[op]} are not supported (they need a backtracking matcher)")
        if op is _c.LITERAL:
            return self._add(_CHAR, _is_char(chr(av)), [nxt])
        if op is _c.NOT_LITERAL:
            return self._add(_CHAR, _is_not_char(chr(av)), [nxt])
        if op is _c.ANY:
            return self._add(_CHAR, (lambda ch: True) if self.dotall else (lambda ch: ch != "\n"), [nxt])
        if op is _c.IN:
            return self._add(_CHAR, _set_predicate(av), [nxt])
        if op is _c.SUBPATTERN:
            _, add_flags, del_flags, sub = av
            if (add_flags | del_flags) & ~_ALLOWED_FLAGS:
                raise PatternError("inline flags other than (?x) and (?s) are not supported")
            return self.seq(sub, nxt)
        if op is _c.BRANCH:
            return self._add(_SPLIT, None, [self.seq(alt, nxt) for alt in av[1]])
        if op in (_c.MAX_REPEAT, _c.MIN_REPEAT):  # lazy or greedy: the same set of matches
            lo, hi, sub = av
            if hi is _c.MAXREPEAT:
                cur = self._add(_SPLIT, None, [])
                self.out[cur] = [self.seq(sub, cur), nxt]
            else:
                cur = nxt
                for _ in range(hi - lo):
                    cur = self._add(_SPLIT, None, [self.seq(sub, cur), nxt])
            for _ in range(lo):
                cur = self.seq(sub, cur)
            return cur
        if op is _c.AT:
            if av not in (
                _c.AT_BEGINNING,
                _c.AT_BEGINNING_STRING,
                _c.AT_END,
                _c.AT_END_STRING,
                _c.AT_BOUNDARY,
                _c.AT_NON_BOUNDARY,
            ):
                raise PatternError(f"anchor {av} is not supported")
            return self._add(_ASSERT, av, [nxt])
        if op in (_c.ASSERT, _c.ASSERT_NOT):
            direction, sub = av
            width = None
            if direction < 0:
                lo, hi = sub.getwidth()
                if lo != hi:
                    raise PatternError("look-behind requires a fixed-width pattern")
                width = lo
            inner = _Nfa(self.dotall)
            inner.start = inner.seq(sub, inner.match)
            self.lookaround = True
            return self._add(_ASSERT, (op is _c.ASSERT, width, inner), [nxt])
        raise PatternError(f"regex construct {op} is not supported")

    # ---- matching ---------------------------------------------------------------------
    def _holds(self, arg, s: str, pos: int) -> bool:
        n = len(s)
        if arg is _c.AT_BEGINNING or arg is _c.AT_BEGINNING_STRING:
            return pos == 0
        if arg is _c.AT_END:
            return pos == n or (pos == n - 1 and s[pos] == "\n")
        if arg is _c.AT_END_STRING:
            return pos == n
        if arg is _c.AT_BOUNDARY or arg is _c.AT_NON_BOUNDARY:
            boundary = (pos > 0 and _word(s[pos - 1])) != (pos < n and _word(s[pos]))
            return boundary == (arg is _c.AT_BOUNDARY)
        positive, width, inner = arg
        if width is None:  # lookahead: the inner pattern matches some s[pos:j]
            found = inner.run(s, pos, None, any_end=True)
        else:  # lookbehind: the inner pattern matches s[pos - width:pos] exactly
            found = pos >= width and inner.run(s, pos - width, pos, any_end=False)
        return found == positive

    def _closure(self, states, s: str, pos: int) -> frozenset:
        stack, seen, live = list(states), set(), []
        while stack:
            i = stack.pop()
            if i in seen:
                continue
            seen.add(i)
            kind = self.kind[i]
            if kind == _SPLIT:
                stack.extend(self.out[i])
            elif kind == _ASSERT:
                if self._holds(self.arg[i], s, pos):
                    stack.append(self.out[i][0])
            else:
                live.append(i)
        return frozenset(live)

    def _cached_closure(self, states: frozenset, s: str, pos: int) -> frozenset:
        if self.lookaround:  # depends on the whole string: not cacheable by context
            return self._closure(states, s, pos)
        n = len(s)
        context = (
            pos == 0,
            pos == n,
            pos == n - 1 and s[-1:] == "\n",
            pos > 0 and _word(s[pos - 1]),
            pos < n and _word(s[pos]),
        )
        key = (states, context)
        found = self._closures.get(key)
        if found is None:
            if len(self._closures) > _CACHE_LIMIT:
                self._closures.clear()
            found = self._closures[key] = self._closure(states, s, pos)
        return found

    def _step(self, states: frozenset, ch: str) -> frozenset:
        key = (states, ch)
        found = self._steps.get(key)
        if found is None:
            if len(self._steps) > _CACHE_LIMIT:
                self._steps.clear()
            found = frozenset(self.out[i][0] for i in states if self.kind[i] == _CHAR and self.arg[i](ch))
            self._steps[key] = found
        return found

    def run(self, s: str, start: int, stop, *, any_end: bool) -> bool:
        """Whether the pattern matches s[start:stop] (stop None: the end), or with
        `any_end` some s[start:j]. Positions stay those of `s` (anchors see the whole)."""
        if not hasattr(self, "_steps"):
            self._steps, self._closures = {}, {}
        stop = len(s) if stop is None else stop
        cur = self._cached_closure(frozenset([self.start]), s, start)
        for pos in range(start, stop):
            if any_end and self.match in cur:
                return True
            cur = self._cached_closure(self._step(cur, s[pos]), s, pos + 1)
            if not cur:
                return False
        return self.match in cur


class TargetPattern:
    """A compiled target_modules regex: `fullmatch(path)` answers as re.fullmatch would."""

    def __init__(self, pattern: str) -> None:
        if len(pattern) > MAX_PATTERN_CHARS:
            raise PatternError(f"the pattern has {len(pattern)} characters (at most {MAX_PATTERN_CHARS})")
        try:
            tree = _p.parse(pattern)
        except (_c.error, RecursionError, OverflowError) as exc:
            raise PatternError(f"not a valid regular expression: {exc}") from None
        if tree.state.flags & ~_ALLOWED_FLAGS:
            raise PatternError("flags other than (?x) and (?s) are not supported")
        self.pattern = pattern
        try:
            self._nfa = _Nfa(dotall=bool(tree.state.flags & _c.SRE_FLAG_DOTALL))
            self._nfa.start = self._nfa.seq(tree, self._nfa.match)
        except RecursionError:
            raise PatternError("the pattern nests too deeply") from None

    def fullmatch(self, name: str) -> bool:
        return self._nfa.run(name, 0, None, any_end=False)


@lru_cache(maxsize=64)
def compile_target_pattern(pattern: str) -> TargetPattern:
    """The compiled pattern (cached: one per config), or PatternError saying why not."""
    return TargetPattern(pattern)
