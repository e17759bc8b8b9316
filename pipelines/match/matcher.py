"""Matching captions against the query list, many captions per call.

Both modes reduce to one rule: a query matches a text when the query's token sequence occurs as a
contiguous run of the text's tokens.

- `words` (default): tokens are maximal runs of Unicode word characters (Python's `\\w`) of the
  case-folded text (`str.casefold`). So `(dog)`, `dog,` and `Dog` match `dog`; `hotdog` and `dogs` do
  not; `new-york` matches `new york`.
- `metaclip`: MetaCLIP's substring rule. The text gets spaces around `, . ; : ? ! \\`` and `\\t \\n \\r`
  become spaces; a query q matches when `" q "` is a substring of `" text "`. Case-sensitive. That is
  exactly "the query's space-separated tokens occur among the text's space-separated tokens, each pair
  separated by exactly one space", which is what the kernel checks.

The kernel walks a trie of query token sequences (an Aho-Corasick goto function over tokens) from every
token of every caption, in one compiled loop over the UTF-8 bytes of an Arrow string array: no Python
object per caption, per token or per match. Token lookups hash the code points and then compare them,
so a hash collision can never make a false match.
"""

from __future__ import annotations

import re
import time
from functools import lru_cache

import numba
import numpy as np
import pyarrow as pa

MODES = ("words", "metaclip")
METACLIP_WRAP = ",.;:?!`"
METACLIP_SPACE = "\t\n\r"
_EMPTY = 0xFFFFFFFFFFFFFFFF  # an empty slot in the open-addressing tables
MAX_TOKEN = 128  # code points; longer text tokens cannot be query tokens (checked at build)


@lru_cache(maxsize=1)
def unicode_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per code point: is it a word character (`\\w`), and its case folding (single code point, or
    -1 with the expansion in a CSR pair). Built from Python's own functions, so the kernel agrees
    with `re` and `str.casefold` exactly."""
    n = 0x110000
    chars = [chr(c) if not 0xD800 <= c < 0xE000 else " " for c in range(n)]
    word = np.fromiter((c.isalnum() or c == "_" for c in chars), bool, n)
    single = np.arange(n, dtype=np.int32)
    ptr, cps = [0], []
    for c in range(n):
        f = chars[c].casefold()
        if f == chars[c]:
            continue
        if len(f) == 1:
            single[c] = ord(f)
        else:
            single[c] = -1 - (len(ptr) - 1)
            cps.extend(map(ord, f))
            ptr.append(len(cps))
    return word, single, np.array(ptr, np.int64), np.array(cps, np.int32)


@lru_cache(maxsize=2)
def character_kinds(mode: str) -> np.ndarray:
    """Per code point, what the kernel does with it: 0 part of a token, 1 a space (token break),
    2 a token of its own between spaces (MetaCLIP's wrapped punctuation)."""
    if mode == "words":
        return (~unicode_tables()[0]).astype(np.int8)
    kinds = np.zeros(0x110000, np.int8)
    kinds[[ord(c) for c in " " + METACLIP_SPACE]] = 1
    kinds[[ord(c) for c in METACLIP_WRAP]] = 2
    return kinds


def query_tokens(query: str, mode: str) -> list[str]:
    if mode == "words":
        return re.findall(r"\w+", query.casefold())
    tokens = query.split(" ")
    # Such a query can never be a substring of the spaced text: wrapped punctuation is always its own
    # token there, and tabs and newlines are gone.
    if any(not t or any(c in METACLIP_SPACE for c in t) or
           (len(t) > 1 and any(c in METACLIP_WRAP for c in t)) for t in tokens):
        return []
    return tokens


@numba.njit(cache=True, inline="always")
def _mix(h):
    h ^= h >> np.uint64(33)
    h *= np.uint64(0xFF51AFD7ED558CCD)
    h ^= h >> np.uint64(33)
    return h


@numba.njit(cache=True)
def _hash_cps(cps, start, end):
    h = np.uint64(0xCBF29CE484222325)
    for k in range(start, end):
        h = (h ^ np.uint64(cps[k])) * np.uint64(0x100000001B3)
    return _mix(h)


@numba.njit(cache=True)
def _build_table(hashes, size):
    """Open addressing with linear probing. Row s of the table is (hash, index + 1), 0 when empty:
    one probe reads one cache line. `hashes` are already mixed."""
    mask = np.uint64(size - 1)
    table = np.zeros((size, 2), np.uint64)
    for i in range(len(hashes)):
        s = hashes[i] & mask
        while table[s, 1] != 0:
            s = (s + np.uint64(1)) & mask
        table[s, 0] = hashes[i]
        table[s, 1] = i + 1
    return table


# A row of the state table, one cache line of int32s. States 0..V-1 are the roots of the V vocabulary
# tokens, so a token's id is also its first state; deeper states follow.
# SIG is a 32-bit summary of a state's outgoing tokens (bit `tok % 32`): when the next token's bit is
# clear there is no edge, and the edge table (large, so often not in cache) is not probed at all.
TERM_START, TERM_COUNT, FIRST_QUERY, CPS_START, CPS_LEN, SIG = range(6)
ROW = 8


@numba.njit(cache=True)
def _build_token_table(hashes, size):
    """Vocabulary lookup: each slot packs the hash's top 32 bits with the token id + 1 (0 = empty),
    8 bytes a slot, so more of the table stays in cache. Code points are compared on a hit."""
    mask = np.uint64(size - 1)
    table = np.zeros(size, np.uint64)
    for i in range(len(hashes)):
        s = hashes[i] & mask
        while table[s] != 0:
            s = (s + np.uint64(1)) & mask
        table[s] = (hashes[i] & np.uint64(0xFFFFFFFF00000000)) | np.uint64(i + 1)
    return table


@numba.njit(cache=True)
def _find_token(h, buf, n, vtable, rows, vcps):
    mask = np.uint64(len(vtable) - 1)
    top = h & np.uint64(0xFFFFFFFF00000000)
    s = h & mask
    while True:
        slot = vtable[s]
        if slot == 0:
            return -1
        i = np.int64(slot & np.uint64(0xFFFFFFFF)) - 1
        if (slot & np.uint64(0xFFFFFFFF00000000)) == top and rows[i, CPS_LEN] == n:
            same = True
            base = rows[i, CPS_START]
            for k in range(n):
                if vcps[base + k] != buf[k]:
                    same = False
                    break
            if same:
                return i
        s = (s + np.uint64(1)) & mask


@numba.njit(cache=True)
def _find_edge(state, tok, V, etable, edst):
    h = _mix(np.uint64(state * V + tok))
    mask = np.uint64(len(etable) - 1)
    s = h & mask
    while True:
        if etable[s, 1] == 0:
            return -1
        if etable[s, 0] == h:  # the mix is a bijection: equal hashes mean equal keys
            return edst[np.int64(etable[s, 1]) - 1]
        s = (s + np.uint64(1)) & mask


@numba.njit(cache=True)
def _match_kernel(data, offsets, metaclip, kinds, fold1, fptr, fcps,
                  vtable, vcps, rows, etable, edst, tids, V):
    n = len(offsets) - 1
    out_off = np.zeros(n + 1, np.int64)
    cap = max(16, n * 4)
    out = np.empty(cap, np.int32)
    nout = 0
    maxlen = 0
    for i in range(n):
        maxlen = max(maxlen, offsets[i + 1] - offsets[i])
    toks = np.empty(3 * maxlen + 2, np.int32)
    adj = np.empty(3 * maxlen + 2, np.bool_)
    buf = np.empty(MAX_TOKEN, np.int32)
    exp = np.empty(4, np.int32)
    for i in range(n):
        ntok = 0
        in_tok = False
        tlen = 0
        h = np.uint64(0)
        gap = 0
        p = offsets[i]
        end = offsets[i + 1]
        while p <= end:
            # Decode one code point (the end of the caption acts as a final space).
            if p == end:
                c = 32
                p += 1
            else:
                b = data[p]
                if b < 0x80:
                    c = b
                    p += 1
                elif b < 0xE0:
                    c = ((b & 0x1F) << 6) | (data[p + 1] & 0x3F)
                    p += 2
                elif b < 0xF0:
                    c = ((b & 0x0F) << 12) | ((data[p + 1] & 0x3F) << 6) | (data[p + 2] & 0x3F)
                    p += 3
                else:
                    c = (((b & 0x07) << 18) | ((data[p + 1] & 0x3F) << 12)
                         | ((data[p + 2] & 0x3F) << 6) | (data[p + 3] & 0x3F))
                    p += 4
            # What this code point becomes: a folded expansion (words) or itself (metaclip).
            nexp = 1
            exp[0] = c
            if metaclip:
                pass
            elif c < 128:
                if 65 <= c <= 90:  # ASCII capitals: the common case of case folding
                    exp[0] = c + 32
            else:
                f = fold1[c]
                if f >= 0:
                    exp[0] = f
                else:
                    k = -1 - f
                    nexp = fptr[k + 1] - fptr[k]
                    for j in range(nexp):
                        exp[j] = fcps[fptr[k] + j]
            for j in range(nexp):
                c = exp[j]
                # kind: 0 = token character, 1 = space, 2 = a one-character token between spaces
                kind = kinds[c]
                steps = 3 if kind == 2 else 1
                for step in range(steps):
                    is_space = kind == 1 or (kind == 2 and step != 1)
                    if is_space:
                        if in_tok:
                            t = -1
                            if tlen <= MAX_TOKEN:
                                t = _find_token(_mix(h), buf, tlen, vtable, rows, vcps)
                            toks[ntok - 1] = t
                            in_tok = False
                            gap = 0
                        gap += 1
                    else:
                        if not in_tok:
                            in_tok = True
                            adj[ntok] = (not metaclip) or gap == 1
                            ntok += 1
                            tlen = 0
                            h = np.uint64(0xCBF29CE484222325)
                        if tlen < MAX_TOKEN:
                            buf[tlen] = c
                        tlen += 1
                        h = (h ^ np.uint64(c)) * np.uint64(0x100000001B3)
        # Walk the trie from every token.
        start_out = nout
        for a in range(ntok):
            t = toks[a]
            if t < 0:
                continue
            state = t
            b = a
            while state >= 0:
                count = rows[state, TERM_COUNT]
                if count:
                    if nout + count > len(out):
                        grown = np.empty(2 * (nout + count), np.int32)
                        grown[:nout] = out[:nout]
                        out = grown
                    out[nout] = rows[state, FIRST_QUERY]
                    for k in range(1, count):
                        out[nout + k] = tids[rows[state, TERM_START] + k]
                    nout += count
                b += 1
                if b >= ntok or not adj[b] or toks[b] < 0:
                    break
                if not (rows[state, SIG] >> (toks[b] & 31)) & 1:
                    break
                state = _find_edge(state, toks[b], V, etable, edst)
        # Sorted and distinct: a query found twice in one text is recorded once.
        if nout - start_out > 1:
            for r in range(start_out + 1, nout):  # insertion sort: the lists are short
                v = out[r]
                k = r - 1
                while k >= start_out and out[k] > v:
                    out[k + 1] = out[k]
                    k -= 1
                out[k + 1] = v
            w = start_out + 1
            for r in range(start_out + 1, nout):
                if out[r] != out[w - 1]:
                    out[w] = out[r]
                    w += 1
            nout = w
        out_off[i + 1] = nout
    return out_off, out[:nout]


class QueryMatcher:
    """One automaton over a query list; `match` takes an Arrow string array of any length."""

    def __init__(self, queries: list[str], mode: str = "words", counts: list | None = None):
        """`counts` (optional, e.g. the query list's corpus counts) only orders the tables so that
        frequent tokens sit together in memory; matches are the same without it."""
        if mode not in MODES:
            raise ValueError(f"unknown match mode {mode!r}; modes: {', '.join(MODES)}")
        t0 = time.perf_counter()
        self.mode = mode
        self.num_queries = len(queries)
        seqs = [(qid, tokens) for qid, q in enumerate(queries)
                if (tokens := query_tokens(q, mode)) and all(len(t) <= MAX_TOKEN for t in tokens)]
        vocab = self._vocab_ids(seqs, counts)
        id_seqs = [(qid, [vocab[t] for t in tokens]) for qid, tokens in seqs]
        V = max(len(vocab), 1)

        vptr = np.zeros(len(vocab) + 1, np.int64)
        vptr[1:] = np.cumsum([len(t) for t in vocab])
        vcps = np.array([ord(c) for t in vocab for c in t], np.int32)
        vhash = np.array([_hash_cps(vcps, vptr[i], vptr[i + 1]) for i in range(len(vocab))], np.uint64)

        # The trie: state t < V is token t's root; deeper states are numbered level by level and,
        # within a level, by (parent, token), so frequent prefixes sit together in memory.
        keys, dst, terminals = [], [], {}
        frontier = {}
        for qid, ids in id_seqs:
            if len(ids) == 1:
                terminals.setdefault(ids[0], []).append(qid)
            else:
                frontier[qid] = ids[0]
        id_seqs = [(qid, ids) for qid, ids in id_seqs if qid in frontier]
        nstates, depth = V, 1
        while frontier:
            step = sorted({(frontier[qid], ids[depth]) for qid, ids in id_seqs})
            new = {}
            for parent, tok in step:
                new[(parent, tok)] = nstates
                keys.append(parent * V + tok)
                dst.append(nstates)
                nstates += 1
            nxt = {}
            for qid, ids in id_seqs:
                state = new[(frontier[qid], ids[depth])]
                if len(ids) == depth + 1:
                    terminals.setdefault(state, []).append(qid)
                else:
                    nxt[qid] = state
            id_seqs = [(qid, ids) for qid, ids in id_seqs if qid in nxt]
            frontier, depth = nxt, depth + 1

        rows = np.zeros((nstates, ROW), np.int32)
        rows[: len(vocab), CPS_START] = vptr[:-1]
        rows[: len(vocab), CPS_LEN] = np.diff(vptr)
        for k in keys:
            rows[k // V, SIG] |= np.int32(np.uint32(1 << (k % V % 32)).view(np.int32))
        tids = []
        for state in sorted(terminals):
            ids = sorted(terminals[state])
            rows[state, TERM_START] = len(tids)
            rows[state, TERM_COUNT] = len(ids)
            rows[state, FIRST_QUERY] = ids[0]
            tids.extend(ids)
        mixed = np.array([_mix(np.uint64(k)) for k in keys], np.uint64)
        self._tables = (_build_token_table(vhash, _table_size(len(vocab))), vcps, rows,
                        _build_table(mixed, _table_size(len(keys))), np.array(dst, np.int32),
                        np.array(tids, np.int32), V)
        self._unicode = unicode_tables()
        self._kinds = character_kinds(mode)
        self.build_seconds = time.perf_counter() - t0
        self.nbytes = sum(a.nbytes for a in self._tables[:-1])

    @staticmethod
    def _vocab_ids(seqs, counts) -> dict[str, int]:
        first: dict[str, int] = {}
        weight: dict[str, int] = {}
        for qid, tokens in seqs:
            for t in tokens:
                first.setdefault(t, len(first))
            if counts is not None and len(tokens) == 1 and counts[qid]:
                weight[tokens[0]] = max(weight.get(tokens[0], 0), counts[qid])
        order = sorted(first, key=lambda t: (-weight.get(t, 0), first[t]))
        return {t: i for i, t in enumerate(order)}

    def match(self, texts: pa.Array | pa.ChunkedArray | list[str]) -> pa.ListArray:
        """The sorted, distinct query ids matched by each text (null texts match nothing)."""
        if isinstance(texts, list):
            texts = pa.array(texts, pa.large_string())
        if isinstance(texts, pa.ChunkedArray):
            texts = texts.combine_chunks()
        texts = texts.cast(pa.large_string()).fill_null("")
        _, offsets_buf, data_buf = texts.buffers()
        offsets = np.frombuffer(offsets_buf, np.int64)[texts.offset : texts.offset + len(texts) + 1]
        data = np.frombuffer(data_buf, np.uint8) if data_buf is not None else np.zeros(1, np.uint8)
        _, fold1, fptr, fcps = self._unicode
        out_off, ids = _match_kernel(data, offsets, self.mode == "metaclip", self._kinds, fold1, fptr, fcps,
                                     *self._tables)
        return pa.ListArray.from_arrays(pa.array(out_off.astype(np.int32)), pa.array(ids, pa.int32()))


def _table_size(n: int) -> int:
    size = 16
    while size < 2 * n:
        size *= 2
    return size
