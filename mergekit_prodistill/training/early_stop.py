"""When a block's training stops early: its loss on the held-out prompts no longer falls."""

from typing import List


class EarlyStop:
    """Ends a block's training once its loss on the held-out prompts has not improved by
    MIN_GAIN for ``patience`` checks in a row; it is checked every CHECK_STEPS optimiser
    steps (rounded to whole epochs of ``steps_per_epoch``)."""

    CHECK_STEPS = 10
    MIN_GAIN = 0.01  # relative

    def __init__(self, patience: int, steps_per_epoch: int, loss_of):
        self.patience, self.loss_of = patience, loss_of
        self.every = max(1, round(self.CHECK_STEPS / steps_per_epoch))
        self.losses: List[float] = []  # every check's held-out loss
        self.best, self.waited, self.epoch = float("inf"), 0, 0

    def __call__(self, epoch: int, weights) -> bool:
        if epoch <= self.epoch:  # a retry after a non-finite loss trains from the start
            self.losses.clear()
            self.best, self.waited = float("inf"), 0
        self.epoch = epoch
        if epoch % self.every:
            return False
        loss = self.loss_of(weights)
        self.losses.append(loss)
        if loss < self.best * (1 - self.MIN_GAIN):
            self.best, self.waited = loss, 0
        else:
            self.waited += 1
        return self.waited >= self.patience
