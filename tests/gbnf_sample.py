"""A tiny GBNF reader and random-sentence generator, for testing our grammars in Python.

It understands the subset :mod:`inferd.chat.grammar` writes (one rule per line,
literals, character classes, groups, ``? * + {m} {m,} {m,n}``, alternation, rule
references). Sampling random derivations and checking each against the JSON schema
(and through the family parser) shows the grammar admits only valid output, without
a model; the llama.cpp sampler then shows llama.cpp parses the same text.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from typing import Union

_POOL = list("abcxyzABCXYZ019 _-.,:;!?'\"\\/<>|{}[]()\té東🙂\n")


@dataclass
class Lit:
    s: str


@dataclass
class Cls:
    negated: bool
    ranges: list[tuple[str, str]]

    def ok(self, c: str) -> bool:
        inside = any(a <= c <= b for a, b in self.ranges)
        return inside != self.negated


@dataclass
class Ref:
    name: str


@dataclass
class Rep:
    item: Node
    lo: int
    hi: int | None


@dataclass
class Alt:
    options: list[list[Node]]


Node = Union[Lit, Cls, Ref, Rep, Alt]  # noqa: UP007 - forward refs in a runtime alias


def _unescape(s: str, i: int) -> tuple[str, int]:
    c = s[i + 1]
    simple = {
        "n": "\n",
        "r": "\r",
        "t": "\t",
        "\\": "\\",
        '"': '"',
        "]": "]",
        "[": "[",
        "-": "-",
        "^": "^",
    }
    if c in simple:
        return simple[c], i + 2
    if c == "x":
        return chr(int(s[i + 2 : i + 4], 16)), i + 4
    if c == "u":
        return chr(int(s[i + 2 : i + 6], 16)), i + 6
    raise ValueError(f"escape \\{c}")


class _P:
    def __init__(self, s: str) -> None:
        self.s, self.i = s, 0

    def ws(self) -> None:
        while self.i < len(self.s) and self.s[self.i] in " \t":
            self.i += 1

    def alt(self) -> Alt:
        options = [self.seq()]
        self.ws()
        while self.i < len(self.s) and self.s[self.i] == "|":
            self.i += 1
            options.append(self.seq())
            self.ws()
        return Alt(options)

    def seq(self) -> list[Node]:
        items: list[Node] = []
        while True:
            self.ws()
            if self.i >= len(self.s) or self.s[self.i] in "|)":
                return items
            items.append(self.postfix(self.atom()))

    def atom(self) -> Node:
        s = self.s
        c = s[self.i]
        if c == '"':
            self.i += 1
            out = []
            while s[self.i] != '"':
                if s[self.i] == "\\":
                    ch, self.i = _unescape(s, self.i)
                else:
                    ch, self.i = s[self.i], self.i + 1
                out.append(ch)
            self.i += 1
            return Lit("".join(out))
        if c == "[":
            self.i += 1
            neg = s[self.i] == "^"
            if neg:
                self.i += 1
            ranges = []
            while s[self.i] != "]":
                if s[self.i] == "\\":
                    a, self.i = _unescape(s, self.i)
                else:
                    a, self.i = s[self.i], self.i + 1
                b = a
                if s[self.i] == "-" and s[self.i + 1] != "]":
                    self.i += 1
                    if s[self.i] == "\\":
                        b, self.i = _unescape(s, self.i)
                    else:
                        b, self.i = s[self.i], self.i + 1
                ranges.append((a, b))
            self.i += 1
            return Cls(neg, ranges)
        if c == "(":
            self.i += 1
            a = self.alt()
            assert s[self.i] == ")"
            self.i += 1
            return a
        m = re.compile(r"[a-zA-Z0-9-]+").match(s, self.i)
        assert m, f"bad GBNF at {s[self.i :]!r}"
        self.i = m.end()
        return Ref(m.group())

    def postfix(self, node: Node) -> Node:
        s = self.s
        if self.i < len(s) and s[self.i] in "?*+":
            op = s[self.i]
            self.i += 1
            return Rep(node, 1 if op == "+" else 0, 1 if op == "?" else None)
        if self.i < len(s) and s[self.i] == "{":
            j = s.index("}", self.i)
            body = s[self.i + 1 : j]
            self.i = j + 1
            if "," in body:
                lo, hi = body.split(",")
                return Rep(node, int(lo), int(hi) if hi else None)
            return Rep(node, int(body), int(body))
        return node


def parse_gbnf(text: str) -> dict[str, Alt]:
    rules = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        name, _, body = line.partition("::=")
        p = _P(body.strip())
        rules[name.strip()] = p.alt()
        assert p.i == len(p.s), f"trailing text in rule {name}: {p.s[p.i :]!r}"
    for rule in rules.values():
        _check_refs(rule, rules)
    return rules


def _check_refs(node: Node, rules: dict[str, Alt]) -> None:
    if isinstance(node, Ref):
        assert node.name in rules, f"undefined rule {node.name}"
    elif isinstance(node, Rep):
        _check_refs(node.item, rules)
    elif isinstance(node, Alt):
        for opt in node.options:
            for n in opt:
                _check_refs(n, rules)


class Sampler:
    """Random derivations; past ``soft_depth`` it takes the shortest choices."""

    def __init__(self, text: str, seed: int = 0, soft_depth: int = 12) -> None:
        self.rules = parse_gbnf(text)
        self.rng = random.Random(seed)
        self.soft = soft_depth
        self.cost = {k: math.inf for k in self.rules}
        for _ in range(50):
            for k, v in self.rules.items():
                self.cost[k] = self._cost(v)

    def _cost(self, node: Node) -> float:
        if isinstance(node, Lit):
            return len(node.s)
        if isinstance(node, Cls):
            return 1
        if isinstance(node, Ref):
            return self.cost[node.name] + 1
        if isinstance(node, Rep):
            return node.lo * self._cost(node.item)
        return min(sum(self._cost(n) for n in opt) for opt in node.options)

    def sentence(self, root: str = "root") -> str:
        out: list[str] = []
        self._gen(Ref(root), out, 0)
        return "".join(out)

    def _gen(self, node: Node, out: list[str], depth: int) -> None:
        r = self.rng
        if isinstance(node, Lit):
            out.append(node.s)
        elif isinstance(node, Cls):
            pool = [c for c in _POOL if node.ok(c)]
            if not node.negated:
                for a, b in node.ranges:
                    pool.append(chr(r.randint(ord(a), ord(b))))
            out.append(r.choice(pool))
        elif isinstance(node, Ref):
            self._gen(self.rules[node.name], out, depth + 1)
        elif isinstance(node, Rep):
            hi = node.hi if node.hi is not None else node.lo + 3
            n = node.lo if depth > self.soft else r.randint(node.lo, hi)
            for _ in range(n):
                self._gen(node.item, out, depth + 1)
        else:
            opts = node.options
            if depth > self.soft:
                opt = min(opts, key=lambda o: sum(self._cost(n) for n in o))
            else:
                opt = r.choice(opts)
            for n in opt:
                self._gen(n, out, depth)
