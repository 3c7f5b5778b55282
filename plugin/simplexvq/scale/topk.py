"""The K smallest deviations per column, streamed over chunks of rows (the generic part of every backend).

A *column* is one (group, vertex) pair, ``C = G * S`` of them (``S = M`` unless a vertex subset is given). For
every column eq. 13 needs the K rows of smallest deviation ``D(e_m, p_n)``. Rows are streamed in chunks and merged
into a :class:`RunningTopK` (memory ``O(chunk * C + K * C)`` instead of ``O(N * C)``).

Empty slots (``rows == -1``) hold ``+inf`` and never win against a real row, even one whose deviation is ``+inf``
(:func:`empty_slots_last`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["RunningTopK", "default_chunk_size", "empty_slots_last", "streamed_topk"]


@dataclass
class RunningTopK:
    """The K smallest deviations seen so far in each of C columns and the rows they come from.

    ``values`` (K, C) (``+inf`` in slots not filled yet), ``rows`` (K, C) long (``-1`` there). The K slots of a
    column are not sorted.
    """

    values: Tensor
    rows: Tensor
    rows_seen: int = 0
    _below: Tensor | None = field(default=None, repr=False, compare=False)  # reused buffer of :meth:`_candidates`

    @classmethod
    def empty(cls, k: int, columns: int, *, dtype: torch.dtype, device: torch.device) -> RunningTopK:
        return cls(
            values=torch.full((k, columns), float("inf"), dtype=dtype, device=device),
            rows=torch.full((k, columns), -1, dtype=torch.long, device=device),
        )

    @property
    def k(self) -> int:
        return self.values.shape[0]

    @torch.no_grad()
    def update(self, chunk: Tensor, row_offset: int) -> None:
        """Merge the deviations ``chunk`` (c, C) of rows ``row_offset, ..., row_offset + c - 1``.

        Only entries below their column's current K-th smallest value can enter. Once the state is full these are
        few (about ``K c / rows seen`` per column for rows in random order), so they are extracted sparsely and
        merged with a top-K over ``K + L`` rows (L: most candidates in one column) instead of ``K + c``; when many
        entries qualify (first chunk, adversarial order) the whole chunk is merged densely.
        """
        num_rows, columns = chunk.shape
        if num_rows > max(self.k, self.rows_seen):  # early on, grow geometrically: the threshold tightens sooner
            start = 0
            while start < num_rows:
                step = max(self.k, self.rows_seen)
                self.update(chunk[start : start + step], row_offset + start)
                start += step
            return
        if num_rows == 0:
            return
        if self.rows_seen < self.k:
            self.merge_dense(torch.arange(columns, device=chunk.device), chunk, self._row_ids(row_offset, num_rows))
            self.rows_seen += num_rows
            return
        self.rows_seen += num_rows
        row, column = self._candidates(chunk)
        if row.numel() * 4 > chunk.numel():  # dense enough: one top-K over the touched columns
            touched = torch.bincount(column, minlength=columns).nonzero().squeeze(1)
            self.merge_dense(touched, chunk.index_select(1, touched), self._row_ids(row_offset, num_rows))
            return
        self.merge_entries(row + row_offset, column, chunk[row, column])

    @torch.no_grad()
    def merge_entries(self, row: Tensor, column: Tensor, value: Tensor) -> None:
        """Merge sparse entries: ``value[i]`` is the deviation of row ``row[i]`` (global index) in ``column[i]``."""
        if row.numel() == 0:
            return
        columns = self.values.shape[1]
        counts = torch.bincount(column, minlength=columns)
        skewed = int(counts.max()) > 4 * self.k
        if skewed:  # first keep the K smallest entries of each column
            order = value.argsort(stable=True)
            row, column, value = row[order], column[order], value[order]
        order = column.argsort(stable=True)  # group the entries by column (by value within it if sorted above)
        row, column, value = row[order], column[order], value[order]
        position = torch.arange(row.numel(), device=row.device) - (counts.cumsum(0) - counts)[column]
        if skewed:
            kept = position < self.k
            row, column, value, position = row[kept], column[kept], value[kept], position[kept]
            counts = counts.clamp_max(self.k)
        touched = counts.nonzero().squeeze(1)
        slot = (counts > 0).cumsum(0).sub_(1)[column]
        longest = int(counts.max())
        values = value.new_full((longest, touched.numel()), float("inf"))
        values[position, slot] = value
        rows = torch.full((longest, touched.numel()), -1, dtype=torch.long, device=row.device)
        rows[position, slot] = row
        self.merge_dense(touched, values, rows)

    def _candidates(self, chunk: Tensor) -> tuple[Tensor, Tensor]:
        """(row, column) of every entry of ``chunk`` below its column's current K-th smallest value, row-major.

        Same as ``(chunk < threshold).nonzero(as_tuple=True)``, several times faster when candidates are sparse
        (the usual case): the comparison goes into a reused flat bool buffer, ``nonzero`` scans it as int64 words
        (8 entries at a time) and only the few nonzero words are expanded.
        """
        num_rows, columns = chunk.shape
        size = num_rows * columns
        words = -(-size // 8)
        buffer = self._below
        if buffer is None or buffer.numel() < 8 * words or buffer.device != chunk.device:
            capacity = 1 << (words - 1).bit_length()  # pieces grow geometrically: at most 2x the largest one
            buffer = self._below = torch.zeros(8 * capacity, dtype=torch.bool, device=chunk.device)
        buffer[size : 8 * words] = False  # the tail of the last word
        torch.lt(chunk, self.values.amax(dim=0), out=buffer[:size].view(num_rows, columns))
        packed = buffer[: 8 * words].view(torch.int64)
        (word,) = packed.nonzero(as_tuple=True)
        if word.numel() == 0:
            return word, word
        bytes_ = packed[word].view(torch.bool).view(-1, 8)  # (nonzero words, 8) in memory order
        index, offset = bytes_.nonzero(as_tuple=True)
        position = word[index] * 8 + offset
        return position.div(columns, rounding_mode="floor"), position.remainder(columns)

    def _row_ids(self, row_offset: int, num_rows: int) -> Tensor:
        return torch.arange(row_offset, row_offset + num_rows, device=self.rows.device).unsqueeze(1)

    def merge_dense(self, columns: Tensor, values: Tensor, rows: Tensor) -> None:
        """Keep the K smallest of the state and ``values`` (L, len(columns)) in ``columns``; ``rows`` (L, 1) or
        (L, len(columns)) their row indices."""
        every = columns.numel() == self.values.shape[1]
        old_values = self.values if every else self.values.index_select(1, columns)
        old_rows = self.rows if every else self.rows.index_select(1, columns)
        all_values = torch.cat([old_values, values])
        all_rows = torch.cat([old_rows, rows.expand(-1, values.shape[1])])
        top = empty_slots_last(all_values, all_rows).topk(self.k, dim=0, largest=False, sorted=False)
        new_values, new_rows = all_values.gather(0, top.indices), all_rows.gather(0, top.indices)
        if every:
            self.values, self.rows = new_values, new_rows
        else:
            self.values[:, columns] = new_values
            self.rows[:, columns] = new_rows


def empty_slots_last(values: Tensor, rows: Tensor) -> Tensor:
    """``values`` with NaN in empty slots (``rows < 0``): ``topk(largest=False)`` ranks NaN after every number,
    ``+inf`` included, so a real row whose deviation is ``+inf`` (probability exactly 0) wins against an empty slot
    (an ``+inf`` placeholder would tie with it and could take its place)."""
    return torch.where(rows >= 0, values, values.new_full((), float("nan")))


@torch.no_grad()
def streamed_topk(
    chunk_deviation: Callable[[int, int], Tensor],
    num_rows: int,
    k: int,
    columns: int,
    chunk_size: int,
    *,
    dtype: torch.dtype,
    device: torch.device,
) -> RunningTopK:
    """Stream rows ``[start, end)`` through ``chunk_deviation(start, end) -> (end - start, C)`` into a top-K."""
    state = RunningTopK.empty(k, columns, dtype=dtype, device=device)
    for start in range(0, num_rows, chunk_size):
        end = min(start + chunk_size, num_rows)
        state.update(chunk_deviation(start, end), start)
    return state


def default_chunk_size(columns: int, budget: int = 1 << 22) -> int:
    """Rows per chunk so that one (chunk, G, M) buffer holds about ``budget`` elements (16 MiB in float32)."""
    return max(1, budget // max(columns, 1))
