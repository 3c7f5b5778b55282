"""The KNN regularizer (eq. 13) at scale: streamed top-K over row chunks and global neighbours across ranks.

:func:`simplexvq.functional.knn_loss` delegates here when it is called with ``scope="global"``, ``chunk_size`` or
``vertices``; :mod:`simplexvq.efficient` reuses the same pieces for the fused memory-efficient quantizer.

Terms. A *column* is one (group, vertex) pair, ``C = G * S`` of them (``S = M`` unless a vertex subset is given).
For every column the regularizer needs the K rows of smallest deviation ``D(e_m, p_n)``. Rows are streamed in
chunks and merged into a :class:`RunningTopK` (memory ``O(chunk * C + K * C)`` instead of ``O(N * C)``).

Global scope (the paper's section 5.3 limitation, lifted). Each rank keeps its local top-K per column, the K x C
candidate deviations of all W ranks are all-gathered (one ``all_reduce`` of the row count and one ``all_gather``,
called on every rank, also on ranks without rows), and every rank keeps those of its own candidates that are in the
global top-K. The global top-K of a column is always among the union of the local top-Ks, so this is exact.

Reconciling the reported value with DDP's gradient averaging. Every rank returns the *global* loss (the
single-process loss on the concatenated batch, identical on all ranks), but with the gradient of
``W * (its own selected terms)``: DDP (or Accelerate, FSDP) averages gradients over the W ranks, and the average
of ``W * grad(local part)`` is the sum of the local parts' gradients, i.e. the gradient of the global loss. Input
gradients seen on one rank are therefore W times the single-process input gradients of that rank's rows; every
parameter gradient is exact after DDP's averaging. Code that sums (instead of averaging) gradients over ranks must
divide by W.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor

from simplexvq.blockmax import BlockMaxima

KnnScope = Literal["local", "global"]
KnnDistance = Literal["ce", "l2"]
SCOPES: tuple[str, ...] = ("local", "global")

__all__ = [
    "KnnScope",
    "RunningTopK",
    "World",
    "check_chunk_size",
    "check_k",
    "check_k_fits",
    "check_vertices",
    "default_chunk_size",
    "deviation",
    "empty_slots_last",
    "global_row_count",
    "knn_loss_scaled",
    "score_candidates",
    "select_among_gathered",
    "select_global",
    "selected_entries",
    "streamed_topk",
    "vertex_columns",
    "with_scaled_gradient",
    "world_of",
]


# --------------------------------------------------------------------------------------------------------------
# Checks shared by every entry point
# --------------------------------------------------------------------------------------------------------------


def check_k(k: object, function: str) -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"{function}: k must be a positive integer, got {k!r}")
    return int(k)


def check_k_fits(k: int, num_rows: int, function: str, world_size: int = 1) -> None:
    """K larger than the (global) number of rows is an error: a smaller K would change the loss asked for."""
    if k <= num_rows:
        return
    if world_size > 1:
        raise ValueError(
            f"{function}: k={k} neighbours per code vector requested, but the batches of all {world_size} ranks "
            f"hold only N={num_rows} (unpadded) positions together; K must not exceed the global N: lower k or use "
            "larger batches"
        )
    raise ValueError(
        f"{function}: k={k} neighbours per code vector requested, but the batch holds only N={num_rows} "
        "(unpadded) positions; K must not exceed N: lower k or use a larger batch"
    )


def check_chunk_size(chunk_size: object, function: str) -> int | None:
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
        raise ValueError(
            f"{function}: chunk_size must be a positive integer (rows per chunk) or None, got {chunk_size!r}"
        )
    return int(chunk_size)


def check_vertices(vertices: Tensor | None, groups: int, codebook_size: int, function: str) -> Tensor | None:
    """Validate a vertex subset, (S,) shared by every group or (G, S), and return it as (G, S) long."""
    if vertices is None:
        return None
    if not isinstance(vertices, Tensor) or vertices.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{function}: vertices must be an integer tensor of code indices, got {vertices!r}")
    if vertices.dim() == 1:
        vertices = vertices.unsqueeze(0).expand(groups, -1)
    if vertices.dim() != 2 or vertices.shape[0] != groups or vertices.shape[1] == 0:
        raise ValueError(
            f"{function}: vertices must have shape (S,) or (G={groups}, S) with S >= 1, got {tuple(vertices.shape)}"
        )
    if bool((vertices < 0).any()) or bool((vertices >= codebook_size).any()):
        raise ValueError(f"{function}: vertices must lie in [0, M={codebook_size})")
    ordered = vertices.sort(dim=-1).values
    if bool((ordered[:, 1:] == ordered[:, :-1]).any()):
        raise ValueError(f"{function}: vertices must not repeat within a group (a repeated vertex counts twice)")
    return vertices.long()


# --------------------------------------------------------------------------------------------------------------
# Deviations D(e_m, p) (eq. 13)
# --------------------------------------------------------------------------------------------------------------


def deviation(log_probs: Tensor, distance: KnnDistance, vertices: Tensor | None = None) -> Tensor:
    """``D(e_m, p_n)`` for every row and vertex column: (N, G, M) log-probabilities -> (N, G, S).

    ``"ce"``: ``-log p_m``; ``"l2"``: ``|e_m - p|^2 = 1 - 2 p_m + |p|^2``. ``vertices`` (G, S) keeps those columns.
    """
    if distance == "ce":
        picked = log_probs if vertices is None else vertex_columns(log_probs, vertices)
        return -picked
    probs = log_probs.exp()
    squared_norm = probs.pow(2).sum(dim=-1, keepdim=True)
    picked = probs if vertices is None else vertex_columns(probs, vertices)
    return 1.0 - 2.0 * picked + squared_norm


def vertex_columns(x: Tensor, vertices: Tensor) -> Tensor:
    """``x[n, g, vertices[g, s]]``: (N, G, M) -> (N, G, S)."""
    return x.gather(-1, vertices.unsqueeze(0).expand(x.shape[0], -1, -1))


# --------------------------------------------------------------------------------------------------------------
# Streamed top-K
# --------------------------------------------------------------------------------------------------------------


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
    def update_from_scores(self, scores: Tensor, offsets: Tensor, blocks: BlockMaxima, row_offset: int) -> None:
        """Merge the deviations ``offsets[g, n] - scores[g, n, m]`` of column ``g M + m`` and row ``row_offset + n``.

        ``scores`` (G, c, M), ``offsets`` (G, c), ``blocks`` the :class:`~simplexvq.blockmax.BlockMaxima` of
        ``scores``. For cross-entropy (``-log p = lse - logit``) this is :meth:`update` without the (c, G M)
        deviation matrix and without a full comparison pass: no entry of a block of columns can fall below its
        threshold unless ``max(scores in the block) + max(thresholds of the block) > offset``, so only the (few)
        blocks passing that bound are gathered and compared exactly. Same result as :meth:`update` on
        ``(offsets[..., None] - scores).transpose(0, 1).reshape(c, G M)``.
        """
        groups, num_rows, size = scores.shape
        if num_rows == 0:
            return
        scores, offsets = scores.contiguous(), offsets.contiguous()
        threshold = self.values.amax(dim=0)
        if self.rows_seen < self.k or not bool(threshold.isfinite().all()):  # not full yet: the dense path
            deviations = (offsets.unsqueeze(-1) - scores).transpose(0, 1).reshape(num_rows, groups * size)
            self.update(deviations, row_offset)
            return
        self.rows_seen += num_rows
        self.merge_entries(*score_candidates(scores, offsets, blocks, threshold.view(groups, size), row_offset))

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
def score_candidates(
    scores: Tensor, offsets: Tensor, blocks: BlockMaxima, threshold: Tensor, row_offset: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """(row, column, deviation) of every entry whose deviation ``offsets[g, n] - scores[g, n, m]`` is below
    ``threshold[g, m]``; column ``g M + m``, row ``row_offset + n``.

    ``scores`` (G, c, M) contiguous, ``offsets`` (G, c), ``threshold`` (G, M), ``blocks`` the block maxima of
    ``scores``. No entry of a block of columns can pass unless ``max(scores in the block) + max(thresholds of the
    block) > offset``, so only the blocks passing that bound are gathered (whole, as rows of an overlapping view)
    and compared exactly: neither the (c, G M) deviation matrix nor a full comparison pass is needed.
    """
    num_rows, size = scores.shape[1:]
    covered, width = blocks.covered, blocks.width
    limits = BlockMaxima.of(threshold, width)
    pieces = []
    if covered:
        bound = blocks.full + limits.full.unsqueeze(1) - offsets.unsqueeze(-1)  # (G, c, blocks)
        # rounding of the sums must not hide an entry: accept bounds within a few ulps of zero
        slack = blocks.full.abs() + limits.full.abs().unsqueeze(1) + offsets.abs().unsqueeze(-1)
        passing = (bound > slack * (-8 * torch.finfo(scores.dtype).eps)).reshape(-1).nonzero().squeeze(1)
        # flat (group, row) and block of each passing block, then its first column in scores and thresholds
        group_row = passing.div(covered // width, rounding_mode="floor")
        block_start = (passing - group_row * (covered // width)) * width
        column_start = group_row.div(num_rows, rounding_mode="floor") * size + block_start
        window = _windows(scores.reshape(-1), width).index_select(0, group_row * size + block_start)
        deviation = offsets.reshape(-1).index_select(0, group_row).unsqueeze(-1) - window  # (blocks, width)
        limit = _windows(threshold.reshape(-1), width).index_select(0, column_start)
        hit = (deviation < limit).reshape(-1).nonzero().squeeze(1)
        which = hit.div(width, rounding_mode="floor")
        pieces.append(
            (
                group_row[which].remainder(num_rows),
                column_start[which] + (hit - which * width),
                deviation.reshape(-1)[hit],
            )
        )
    if covered < size:  # the last M % width columns: compared directly
        deviation = offsets.unsqueeze(-1) - scores[..., covered:]  # (G, c, tail)
        group, row, offset = (deviation < threshold[:, covered:].unsqueeze(1)).nonzero(as_tuple=True)
        pieces.append((row, group * size + covered + offset, deviation[group, row, offset]))
    row, column, value = (torch.cat(parts) for parts in zip(*pieces, strict=True))
    return row + row_offset, column, value


def _windows(flat: Tensor, width: int) -> Tensor:
    """Every run of ``width`` consecutive elements of the 1-D ``flat``, as an overlapping (len - width + 1, width)
    view: ``index_select`` on it gathers blocks that start anywhere as whole rows."""
    return flat.as_strided((flat.numel() - width + 1, width), (1, 1))


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


# --------------------------------------------------------------------------------------------------------------
# Global neighbours across ranks
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class World:
    """This rank's place in the process group of a global KNN."""

    rank: int
    size: int
    group: dist.ProcessGroup | None = None


def world_of(scope: str, group: dist.ProcessGroup | None = None) -> World | None:
    """The process group to search globally, or ``None`` for a local search.

    ``scope="global"`` without an initialised process group, or with a single rank, is a local search.
    """
    if scope not in SCOPES:
        raise ValueError(f"knn: scope must be 'local' or 'global', got {scope!r}")
    if scope == "local" or not (dist.is_available() and dist.is_initialized()):
        return None
    size = dist.get_world_size(group)
    if size == 1:
        return None
    return World(rank=dist.get_rank(group), size=size, group=group)


def global_row_count(num_rows: int, world: World, device: torch.device) -> int:
    """Sum of the row counts of all ranks (one ``all_reduce``; every rank must call it)."""
    count = torch.tensor([num_rows], dtype=torch.int64, device=device)
    dist.all_reduce(count, op=dist.ReduceOp.SUM, group=world.group)
    return int(count.item())


def select_among_gathered(gathered: Tensor, k: int, rank: int) -> tuple[Tensor, Tensor]:
    """Global top-K from the candidates of all ranks, ``gathered`` (W, K, C) (NaN = no candidate: it ranks after
    every deviation, ``+inf`` included; see :func:`empty_slots_last`).

    Returns the mask (K, C) of ``rank``'s candidates that are among the K smallest of their column over all ranks,
    and the sum of those K smallest values over every column (identical on every rank). Pure; ties are broken by
    ``torch.topk`` on the same tensor on every rank, so the ranks agree.
    """
    world_size, per_rank, columns = gathered.shape
    top = gathered.reshape(world_size * per_rank, columns).topk(k, dim=0, largest=False, sorted=False)
    owner = top.indices.div(per_rank, rounding_mode="floor")
    slot = top.indices.remainder(per_rank)
    selected = torch.zeros(per_rank, columns, dtype=torch.bool, device=gathered.device)
    mine = owner == rank
    column = torch.arange(columns, device=gathered.device).expand(k, columns)
    selected[slot[mine], column[mine]] = True
    return selected, top.values.sum()


def select_global(values: Tensor, k: int, world: World) -> tuple[Tensor, Tensor]:
    """All-gather the local candidates ``values`` (K, C) and select the global top-K (see
    :func:`select_among_gathered`). One ``all_gather``; every rank must call it."""
    values = values.detach().contiguous()
    buffers = [torch.empty_like(values) for _ in range(world.size)]
    dist.all_gather(buffers, values, group=world.group)
    return select_among_gathered(torch.stack(buffers), k, world.rank)


# --------------------------------------------------------------------------------------------------------------
# The loss on given log-probabilities (functional.knn_loss with scope / chunk_size / vertices)
# --------------------------------------------------------------------------------------------------------------


def knn_loss_scaled(
    log_probs: Tensor,
    k: int,
    distance: KnnDistance,
    *,
    scope: KnnScope = "local",
    chunk_size: int | None = None,
    vertices: Tensor | None = None,
    group: dist.ProcessGroup | None = None,
) -> Tensor:
    """Eq. 13 on (N, G, M) log-probabilities (rows already masked), locally or globally, dense or streamed.

    The value is ``(K G S)^-1`` times the sum, over every (group, vertex) column, of the K smallest deviations
    (over all ranks for a global search). For the global search the gradient is W times this rank's share (see
    the module docstring). ``chunk_size`` streams the top-K over rows and computes the gradient in chunks with an
    analytic backward, so no (N, G, M) temporary beyond the gradient itself is built.
    """
    world = world_of(scope, group)
    num_rows, groups, codebook_size = log_probs.shape
    vertices = check_vertices(vertices, groups, codebook_size, "knn_loss")
    if vertices is not None:
        vertices = vertices.to(log_probs.device)
    columns = groups * (codebook_size if vertices is None else vertices.shape[1])
    if world is None:
        check_k_fits(k, num_rows, "knn_loss")
    else:
        check_k_fits(k, global_row_count(num_rows, world, log_probs.device), "knn_loss", world.size)
    normaliser = k * columns

    if chunk_size is None:
        deviations = deviation(log_probs, distance, vertices).reshape(num_rows, columns)
        local_k = min(k, num_rows)
        top = deviations.topk(local_k, dim=0, largest=False, sorted=False).values  # (local K, C), differentiable
        if world is None:
            return top.sum() / normaliser
        padded = torch.cat([top.detach(), top.new_full((k - local_k, columns), float("nan"))])
        selected, total = select_global(padded, k, world)
        local_part = torch.where(selected[:local_k], top, torch.zeros_like(top)).sum() / normaliser
        return with_scaled_gradient(total / normaliser, local_part, world.size)

    def chunk_deviation(start: int, end: int) -> Tensor:
        return deviation(log_probs[start:end].detach(), distance, vertices).reshape(end - start, columns)

    state = streamed_topk(
        chunk_deviation, num_rows, k, columns, chunk_size, dtype=log_probs.dtype, device=log_probs.device
    )
    if world is None:
        selected, total, scale = state.rows >= 0, state.values.sum(), 1.0
    else:
        selected, total = select_global(empty_slots_last(state.values, state.rows), k, world)
        selected &= state.rows >= 0
        scale = float(world.size)
    return _SelectedDeviation.apply(
        log_probs, total / normaliser, state.rows, selected, vertices, distance, scale / normaliser, chunk_size
    )


def with_scaled_gradient(value: Tensor, local_part: Tensor, scale: float) -> Tensor:
    """A tensor whose value is ``value`` (detached) and whose gradient is that of ``scale * local_part``."""
    scaled = scale * local_part
    return value.detach() + (scaled - scaled.detach())


def selected_entries(rows: Tensor, selected: Tensor, groups: int, vertices: Tensor | None) -> tuple[Tensor, ...]:
    """(row, group, code) of every selected candidate, sorted by row; ``rows``/``selected`` are (K, G * S)."""
    per_group = rows.shape[1] // groups
    slot, column = selected.nonzero(as_tuple=True)
    group = column.div(per_group, rounding_mode="floor")
    vertex = column.remainder(per_group)
    code = vertex if vertices is None else vertices[group, vertex]
    row = rows[slot, column]
    order = row.argsort()
    return row[order], group[order], code[order]


class _SelectedDeviation(torch.autograd.Function):
    """Eq. 13 restricted to the selected (row, group, vertex) entries, with a chunked analytic backward.

    Inputs: log-probabilities (N, G, M), the value to report, the running top-K rows and the selection mask
    (K, G * S), the vertex subset, the distance, the gradient weight ``scale / (K G S)`` and the chunk size.
    Backward, with ``w`` the weight times the upstream gradient:

    * CE: ``d/d log p_{n,m} = -w`` at every selected entry;
    * L2: ``D = 1 - 2 p_m + |p|^2``, so ``d/d log p_{n,j} = w (2 c_n p_j^2 - 2 p_j [j selected in row n])``
      with ``c_n`` the number of selections in row n.
    """

    @staticmethod
    def forward(ctx, log_probs, value, rows, selected, vertices, distance, weight, chunk_size):  # noqa: D102
        ctx.save_for_backward(log_probs, rows, selected, vertices)
        ctx.distance, ctx.weight, ctx.chunk_size = distance, weight, chunk_size
        return value.clone()

    @staticmethod
    def backward(ctx, grad_output):  # noqa: D102
        log_probs, rows, selected, vertices = ctx.saved_tensors
        grad = None
        if ctx.needs_input_grad[0]:
            num_rows, groups, _ = log_probs.shape
            w = grad_output * ctx.weight
            row, group, code = selected_entries(rows, selected, groups, vertices)
            grad = torch.zeros_like(log_probs)
            if ctx.distance == "ce":
                grad.index_put_((row, group, code), (-w).expand(row.shape), accumulate=True)
            else:
                counts = torch.zeros(num_rows, groups, dtype=log_probs.dtype, device=log_probs.device)
                counts.index_put_((row, group), torch.ones_like(row, dtype=log_probs.dtype), accumulate=True)
                touched = counts.sum(dim=-1) > 0
                for start in range(0, num_rows, ctx.chunk_size):
                    end = min(start + ctx.chunk_size, num_rows)
                    if not bool(touched[start:end].any()):
                        continue
                    lp = log_probs[start:end]
                    grad[start:end] = (2.0 * w) * counts[start:end, :, None] * (2.0 * lp).exp()
                picked = log_probs[row, group, code].exp()
                grad.index_put_((row, group, code), -2.0 * w * picked, accumulate=True)
        return grad, None, None, None, None, None, None, None
