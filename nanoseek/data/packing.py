"""Training data: the packed pretraining stream and SFT conversation batches, sharded by rank.

Pretraining (V3 §4.1, deepseek_spec §6.2): every document of the corpus (`pretrain/train-*.jsonl`,
field "text") becomes BOS + tokens + EOS (chat-format documents already carry both), the
documents are concatenated in file order into one token stream (cached as .npy next to the run,
keyed by the tokenizer and the files), and the stream is cut into rows of seq_len + 1 tokens:
packing without cross-document attention masking, as V3 pretrained. Row order is a fresh seeded
permutation each epoch.

SFT: each conversation ({"messages": [...]}) is `Tokenizer.encode_conversation` → ids + loss mask
(1 on the final assistant turn only), truncated to seq_len + 1, and conversations are packed
first-fit in a seeded order into rows of seq_len + 1 tokens (V3 §5.1 packs SFT samples with
sample masking). `Batch.segments` numbers the documents of a row; the model attends only within
a document (`model(ids, segments=…)`: block-diagonal causal attention, positions restarting at
0 per document), and a target counts only when it lies in the same document as its input
position (`Batch.targets`), for the main head and every MTP depth alike. The tail of a row that
no remaining conversation fits is padding (segment −1): never a target and never expert load
(`Batch.valid`). Packing is done once, so an epoch is the same rows in a new order. Padding
instead (one conversation per row, right-padded to the longest of its micro-batch) spent ~40 % of
the positions on padding on the tiny SFT set: `pack=False` keeps it as the reference.

Position and sharding. The data position is the number of rows consumed so far; the rows of a
step are [position, position + global_batch) in the epoch permutation, the same for any world
size. Rank r takes the r-th contiguous slice of global_batch / world rows and cuts it into
micro-batches. So `torchrun --nproc_per_node N` sees exactly the rows a single process sees, and a
resumed run (nanoseek.json stores the position) continues with the row it would have read next.

The held-out set is the first rows of the held-out split, unshuffled (`eval_batches`), each rank
evaluating an equal share: the same fixed rows at every evaluation and for any world size.

A Batch holds rows of T + 1 tokens: inputs are tokens[:, :-1]; the main head's target at input
position i is token i+1 and MTP depth k's is token i+k+1, both where `mask` is set (and, packed,
where both lie in the same document).
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import torch

IGNORE = -100


@dataclass
class Batch:
    tokens: torch.Tensor   # [B, T+1] int64
    mask: torch.Tensor     # [B, T+1] bool: this token is a training target
    valid: torch.Tensor    # [B, T+1] bool: a real token (not padding)
    segments: torch.Tensor | None = None   # [B, T+1] int: document number in its row, −1 = padding

    @property
    def inputs(self) -> torch.Tensor:
        return self.tokens[:, :-1]

    @property
    def input_segments(self) -> torch.Tensor | None:
        return None if self.segments is None else self.segments[:, :-1]

    def target_mask(self, k: int) -> torch.Tensor:
        """[B, T−k] bool: depth k's target at input position i (token i+k+1) counts (k = 0: main head)."""
        m = self.mask[:, k + 1:]
        if self.segments is not None:
            m = m & (self.segments[:, k + 1:] == self.segments[:, : m.shape[1]])
        return m

    def targets(self, k: int) -> torch.Tensor:
        """[B, T−k] target token ids of depth k, IGNORE where not a target."""
        return self.tokens[:, k + 1:].masked_fill(~self.target_mask(k), IGNORE)

    def target_counts(self, mtp_depth: int) -> torch.Tensor:
        """Targets of the main head and of each MTP depth: float [1 + mtp_depth]."""
        return torch.stack([self.target_mask(k).sum() for k in range(mtp_depth + 1)]).float()

    @property
    def num_tokens(self) -> int:
        """Real input tokens (what tokens/s counts)."""
        return int(self.valid[:, :-1].sum())


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int) -> Batch:
    """(ids, mask) rows of any length -> right-padded Batch."""
    T1 = max(len(ids) for ids, _ in rows)
    tokens = torch.full((len(rows), T1), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T1, dtype=torch.bool)
    valid = torch.zeros(len(rows), T1, dtype=torch.bool)
    for b, (ids, m) in enumerate(rows):
        tokens[b, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        mask[b, : len(m)] = torch.as_tensor(m, dtype=torch.bool)
        valid[b, : len(ids)] = True
    return Batch(tokens, mask, valid)


def pack_rows(examples: list[tuple[list[int], list[int]]], order: list[int], row_len: int,
              pad_id: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """First-fit packing in `order`: rows of exactly `row_len` tokens as (tokens, mask, segments).
    A document goes into the first open row with room for it; a row's free tail is padding
    (segment −1, mask 0). Rows are returned in the order they were opened.

    >>> rows = pack_rows([([1, 2, 3], [0, 1, 1]), ([4, 5], [0, 1]), ([6, 7, 8, 9], [0, 0, 1, 1])], [0, 1, 2], 5, 0)
    >>> [r[0].tolist() for r in rows], [r[2].tolist() for r in rows]
    ([[1, 2, 3, 4, 5], [6, 7, 8, 9, 0]], [[0, 0, 0, 1, 1], [0, 0, 0, 0, -1]])
    """
    rows: list[list[int]] = []          # example indices per row
    free: list[int] = []                # free tokens per row
    for i in order:
        n = len(examples[i][0])
        j = next((r for r, f in enumerate(free) if f >= n), None)
        if j is None:
            rows.append([]), free.append(row_len)
            j = len(rows) - 1
        rows[j].append(i)
        free[j] -= n
    out = []
    for members in rows:
        tokens = torch.full((row_len,), pad_id, dtype=torch.long)
        mask = torch.zeros(row_len, dtype=torch.bool)
        seg = torch.full((row_len,), -1, dtype=torch.long)
        at = 0
        for d, i in enumerate(members):
            ids, m = examples[i]
            tokens[at: at + len(ids)] = torch.as_tensor(ids)
            mask[at: at + len(m)] = torch.as_tensor(m, dtype=torch.bool)
            seg[at: at + len(ids)] = d
            at += len(ids)
        out.append((tokens, mask, seg))
    return out


# ------------------------------------------------------------------ corpus files
def corpus_files(data_dir: str, part: str, split: str) -> list[str]:
    """`{data_dir}/{part}/{split}-*.jsonl`, sorted; an error naming the pattern when none exist."""
    pattern = os.path.join(data_dir, part, f"{split}-*.jsonl")
    files = sorted(glob.glob(pattern))
    if not files:
        raise FileNotFoundError(f"no corpus files match {pattern} (write them with `nanoseek corpus --out {data_dir}`)")
    return files


def read_jsonl(files: Iterable[str], field: str) -> Iterator:
    for path in files:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)[field]


# ------------------------------------------------------------------ pretraining: packed stream
def tokenize_documents(tok, texts: Iterable[str], chunk: int = 4096) -> np.ndarray:
    """BOS + ids + EOS per document, concatenated (int32). No BOS/EOS is doubled."""
    parts: list[np.ndarray] = []
    bos, eos = np.array([tok.bos_id], np.int32), np.array([tok.eos_id], np.int32)
    buf: list[str] = []

    def flush():
        for enc in tok.backend.encode_batch(buf, add_special_tokens=False):
            ids = np.asarray(enc.ids, dtype=np.int32)
            parts.extend(([bos] if not len(ids) or ids[0] != tok.bos_id else [])
                         + [ids] + ([eos] if not len(ids) or ids[-1] != tok.eos_id else []))
        buf.clear()

    for text in texts:
        buf.append(text)
        if len(buf) == chunk:
            flush()
    if buf:
        flush()
    return np.concatenate(parts) if parts else np.zeros(0, np.int32)


def _cache_key(tok, files: list[str]) -> str:
    h = hashlib.sha256(tok.backend.to_str().encode())
    for f in files:
        st = os.stat(f)
        h.update(f"{os.path.abspath(f)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def cached_tokens(tok, files: list[str], cache_dir: str | None) -> np.ndarray:
    """`tokenize_documents` over the files' "text" fields, cached in cache_dir/<key>.npy."""
    if cache_dir is None:
        return tokenize_documents(tok, read_jsonl(files, "text"))
    path = os.path.join(cache_dir, f"tokens-{_cache_key(tok, files)}.npy")
    if os.path.exists(path):
        return np.load(path)
    arr = tokenize_documents(tok, read_jsonl(files, "text"))
    arr = arr.astype(np.uint16 if tok.vocab_size < 65536 else np.int32)
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}.npy"
    np.save(tmp, arr)
    os.replace(tmp, path)
    return arr


class RowOrder:
    """Global row number g -> row index: a seeded permutation per epoch (identity if not shuffled)."""

    def __init__(self, n_rows: int, seed: int = 0, shuffle: bool = True):
        self.n_rows, self.seed, self.shuffle = n_rows, seed, shuffle
        self._perm: tuple[int, np.ndarray] | None = None

    def __call__(self, g: int) -> int:
        epoch, j = divmod(g, self.n_rows)
        if not self.shuffle:
            return j
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n_rows))
        return int(self._perm[1][j])


class PackedDataset:
    """Rows of seq_len + 1 tokens cut from one token stream; a seeded permutation per epoch."""

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int = 0, shuffle: bool = True):
        self.tokens, self.seq_len = tokens, seq_len
        self.n_rows = (len(tokens) - 1) // seq_len
        if self.n_rows < 1:
            raise ValueError(f"{len(tokens)} tokens are fewer than one row of {seq_len + 1}")
        self.order = RowOrder(self.n_rows, seed, shuffle)

    def rows(self, position: int, count: int) -> Batch:
        T = self.seq_len
        idx = [self.order(g) for g in range(position, position + count)]
        tokens = torch.from_numpy(np.stack([self.tokens[i * T: i * T + T + 1] for i in idx]).astype(np.int64))
        ones = torch.ones_like(tokens, dtype=torch.bool)
        return Batch(tokens, ones, ones)

    def epoch(self, position: int) -> float:
        return position / self.n_rows


# ------------------------------------------------------------------ SFT: conversations
class ConversationDataset:
    """Tokenized conversations (ids, assistant-only loss mask), truncated to seq_len + 1 tokens,
    packed into rows with per-document masks (`pack=True`, see the module docstring), or one per
    row, right-padded per micro-batch (`pack=False`, the reference layout)."""

    def __init__(self, tok, conversations: Iterable[list[dict]], seq_len: int, seed: int = 0,
                 shuffle: bool = True, pack: bool = True):
        self.examples = []
        for messages in conversations:
            ids, mask = tok.encode_conversation(messages)
            self.examples.append((ids[: seq_len + 1], mask[: seq_len + 1]))
        if not self.examples:
            raise ValueError("no conversations")
        self.pad_id, self.seq_len, self.pack = tok.pad_id, seq_len, pack
        self.n_docs = len(self.examples)
        if pack:
            order = np.random.default_rng([seed, 1 << 20]).permutation(self.n_docs).tolist() if shuffle else list(range(self.n_docs))
            self.packed = pack_rows(self.examples, order, seq_len + 1, self.pad_id)
        self.n_rows = len(self.packed) if pack else self.n_docs
        self.order = RowOrder(self.n_rows, seed, shuffle)

    def rows(self, position: int, count: int) -> Batch:
        idx = [self.order(g) for g in range(position, position + count)]
        if not self.pack:
            return collate([self.examples[i] for i in idx], self.pad_id)
        tokens, mask, seg = (torch.stack(t) for t in zip(*(self.packed[i] for i in idx)))
        return Batch(tokens, mask, seg >= 0, seg)

    def epoch(self, position: int) -> float:
        return position / self.n_rows

    def fill(self) -> float:
        """Packed: the share of row positions that hold real tokens."""
        if not self.pack:
            raise ValueError("fill() is the packed layout's; padded rows depend on each micro-batch")
        return sum(len(ids) for ids, _ in self.examples) / (self.n_rows * (self.seq_len + 1))


# ------------------------------------------------------------------ one step's rows for one rank
def step_batches(dataset, position: int, global_batch: int, micro_batch: int,
                 rank: int = 0, world: int = 1) -> list[Batch]:
    """This rank's micro-batches of the step whose rows start at `position` (see module docstring)."""
    if global_batch % (micro_batch * world):
        raise ValueError(f"batch size {global_batch} is not a multiple of micro batch {micro_batch} × "
                         f"{world} ranks")
    per_rank = global_batch // world
    start = position + rank * per_rank
    return [dataset.rows(start + i, micro_batch) for i in range(0, per_rank, micro_batch)]


def eval_batches(dataset, rows: int, micro_batch: int, rank: int = 0, world: int = 1) -> list[Batch]:
    """The first `rows` rows (fixed held-out set; at most what the dataset holds, a multiple of
    `world`), this rank's equal share, in chunks of at most `micro_batch` rows."""
    per_rank = min(rows, dataset.n_rows) // world
    if per_rank < 1:
        raise ValueError(f"{dataset.n_rows} held-out rows cannot be shared by {world} ranks")
    start = rank * per_rank
    return [dataset.rows(start + i, min(micro_batch, per_rank - i)) for i in range(0, per_rank, micro_batch)]
