"""Length-aware batching, sharded across ranks, deterministic given (seed, epoch) so a run resumes exactly."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np


def length_batches(
    lengths: Sequence[int],
    *,
    batch_size: int,
    max_tokens: int | None = None,
    shuffle: bool = True,
    seed: int = 0,
    epoch: int = 0,
) -> list[list[int]]:
    """Group utterance indices into batches of similar length.

    Utterances are sorted by length (longest first; ties in random order when ``shuffle``), then cut greedily into
    batches of at most ``batch_size`` utterances and at most ``max_tokens`` padded samples (batch size times the
    longest length); an utterance longer than ``max_tokens`` gets a batch of its own. With ``shuffle`` the order
    of the batches is random. The same ``(seed, epoch)`` always gives the same batches.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1 or None, got {max_tokens}")
    rng = np.random.default_rng([seed, epoch])
    lengths_array = np.asarray(lengths, dtype=np.int64)
    order = rng.permutation(len(lengths_array)) if shuffle else np.arange(len(lengths_array))
    order = order[np.argsort(-lengths_array[order], kind="stable")]
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for index in order.tolist():
        longest_if_added = max(longest, int(lengths_array[index]))
        too_many = len(current) >= batch_size
        too_long = max_tokens is not None and (len(current) + 1) * longest_if_added > max_tokens
        if current and (too_many or too_long):
            batches.append(current)
            current, longest_if_added = [], int(lengths_array[index])
        current.append(index)
        longest = longest_if_added
    if current:
        batches.append(current)
    if shuffle:
        batches = [batches[i] for i in rng.permutation(len(batches)).tolist()]
    return batches


class ShardedBatchSampler:
    """Yields this rank's batches of ``(index, epoch)`` keys (the epoch seeds each utterance's random crop).

    Every rank computes the same global batch list (:func:`length_batches`) and takes every ``num_replicas``-th
    batch starting at ``rank``. With ``even=True`` (training) the list is first extended by repeating its first
    batches so every rank gets the same number of batches (every rank must join every collective); with
    ``even=False`` (validation) ranks may get one batch fewer and nothing is seen twice.

    :meth:`set_epoch` picks the epoch; :meth:`set_start` skips the first batches of this rank's share (resume).
    """

    def __init__(
        self,
        lengths: Sequence[int],
        *,
        batch_size: int,
        max_tokens: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        even: bool = True,
    ) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
        if len(lengths) == 0:
            raise ValueError("no utterances to batch (empty manifest, or all shorter than data.min_samples)")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.max_tokens = max_tokens
        self.shuffle = shuffle
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.even = even
        self.epoch = 0
        self.start = 0
        self._cache: tuple[int, list[list[int]]] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_start(self, start: int) -> None:
        """Skip the first ``start`` batches of this rank in the current epoch."""
        self.start = start

    def rank_batches(self) -> list[list[int]]:
        """This rank's batches of the current epoch, before skipping."""
        if self._cache is not None and self._cache[0] == self.epoch:
            return self._cache[1]
        batches = length_batches(
            self.lengths,
            batch_size=self.batch_size,
            max_tokens=self.max_tokens,
            shuffle=self.shuffle,
            seed=self.seed,
            epoch=self.epoch,
        )
        if self.even and len(batches) % self.num_replicas:
            missing = self.num_replicas - len(batches) % self.num_replicas
            batches = batches + [batches[i % len(batches)] for i in range(missing)]
        self._cache = (self.epoch, batches[self.rank :: self.num_replicas])
        return self._cache[1]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for batch in self.rank_batches()[self.start :]:
            yield [(index, self.epoch) for index in batch]

    def __len__(self) -> int:
        """Batches of this rank per epoch (without skipping)."""
        return len(self.rank_batches())
