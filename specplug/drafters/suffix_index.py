"""A bounded-depth suffix index over token streams: how often each short token string occurred,
and what followed it.  The data structure behind the `suffix` drafter (suffix.py).

Every string of at most `depth` consecutive tokens of every indexed stream is a path from the
root; a node's `count` is how many times its string occurred.  Appending one token to a stream
extends the strings that end at the stream's last `depth - 1` positions by that token, so an
update costs O(depth) per new token, whatever the stream's length.

Worked example, depth 3, stream a b a b:
  a:2  b:2  ab:2  ba:1  aba:1  bab:1
The string "a b" occurred twice and continued once (by a): its children say P(a | a b) = 1.
Removing a stream walks it again and decrements, so a bounded pool of streams (an LRU of
finished requests) costs memory in proportion to what it holds, never more.
"""
from __future__ import annotations

import heapq


class Node:
    __slots__ = ("count", "children")

    def __init__(self):
        self.count = 0
        self.children: dict[int, Node] = {}


class StreamCursor:
    """Where one stream's growing suffixes end in the index: open[i] is the node of the string
    that starts i + 1 tokens before the stream's end (at most depth - 1 of them stay open)."""
    __slots__ = ("open", "length")

    def __init__(self):
        self.open: list[Node] = []
        self.length = 0


class SuffixIndex:
    def __init__(self, depth: int):
        if depth < 2:
            raise ValueError(f"suffix index depth must be >= 2, got {depth}")
        self.depth = depth
        self.root = Node()

    def append(self, cursor: StreamCursor, tokens: list[int]) -> None:
        """Index `tokens` as the continuation of the stream `cursor` tracks."""
        for tok in tokens:
            grown = []
            for node in [self.root] + cursor.open:
                child = node.children.get(tok)
                if child is None:
                    child = node.children[tok] = Node()
                child.count += 1
                grown.append(child)
            cursor.open = grown[:self.depth - 1]  # strings of length depth take no more tokens
            cursor.length += 1

    def remove(self, tokens: list[int]) -> None:
        """Forget a whole stream that was indexed (from its start) with append.  The walk is
        append's, decrementing; a node that reaches 0 is cut from its parent but kept open for
        the rest of the walk (its longer strings still hold this stream's occurrences)."""
        open_nodes: list[Node] = []
        for tok in tokens:
            grown = []
            for parent in [self.root] + open_nodes:
                child = parent.children[tok]
                child.count -= 1
                if child.count == 0:
                    del parent.children[tok]
                grown.append(child)
            open_nodes = grown[:self.depth - 1]

    def longest_match(self, context: list[int], max_len: int) -> tuple[Node | None, int]:
        """The node of the longest suffix of `context` (at most max_len tokens, depth - 1 at
        most) that occurred and was continued at least once; (None, 0) when none was."""
        for m in range(min(max_len, self.depth - 1, len(context)), 0, -1):
            node = self.root
            for tok in context[len(context) - m:]:
                node = node.children.get(tok)
                if node is None:
                    break
            if node is not None and node.children:
                return node, m
        return None, 0


def best_continuations(node: Node, max_nodes: int, max_depth: int, min_prob: float
                       ) -> list[tuple[int, int, float]]:
    """The most likely continuation tree below `node`, best first: (token, parent index or -1,
    probability of the path).  A child's probability is its share of its parent's continued
    occurrences times its parent's; nodes below min_prob are pruned, at most max_nodes kept,
    and no path is longer than max_depth.  A parent always comes before its children."""
    out: list[tuple[int, int, float]] = []
    # (-prob, tiebreak, parent index, depth, token, node): the heap pops the likeliest
    frontier: list[tuple[float, int, int, int, int, Node]] = []
    serial = 0

    def push_children(parent_node: Node, parent_index: int, parent_prob: float, depth: int):
        nonlocal serial
        total = sum(c.count for c in parent_node.children.values())
        for tok, child in parent_node.children.items():
            prob = parent_prob * child.count / total
            if prob >= min_prob:
                heapq.heappush(frontier, (-prob, serial, parent_index, depth, tok, child))
                serial += 1

    push_children(node, -1, 1.0, 1)
    while frontier and len(out) < max_nodes:
        neg_prob, _, parent, depth, tok, child = heapq.heappop(frontier)
        out.append((tok, parent, -neg_prob))
        if depth < max_depth and child.children:
            push_children(child, len(out) - 1, -neg_prob, depth + 1)
    return out
