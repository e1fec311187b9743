"""A synthetic market whose trades close in profit with a known probability.

Each trade comes with the indicators a trading desk would look at when it opens, and closes a few
seconds later, in profit (outcome 1) or not (outcome 0). The chance of profit is a fixed function of
the indicators, so a model can be truly better than another and the demo can say why:

- RSI (the 14-period relative strength index, 0-100): in the middle band a rising RSI is a trend worth
  following; beyond the 35-65 band the move is stretched and tends to revert (``reversal``). A linear
  model sees only the first half of that.
- MACD (its histogram, in units of the instrument's volatility) pays only when volume confirms it:
  ``macd * tanh(3 (volume_ratio - 1))``. The sign of MACD alone is noise.
- 5-day momentum helps a little; high volatility hurts a little.

``reversal`` is the market's regime: +1 today (stretched moves revert). In a momentum regime (< 0)
stretched moves keep going; a model trained on such a window is confidently wrong today.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FEATURES: tuple[str, ...] = ("rsi", "macd", "volume_ratio", "volatility", "momentum")
"""The model inputs, in this order, each one named tensor in an Open Inference Protocol request."""

TODAY = 1.0
"""The regime the demo trades in: stretched RSI moves revert."""


@dataclass(frozen=True)
class Trade:
    """One trade as it opens: who, what the indicators said, and (known only later) how it closed."""

    trade_id: str
    account: str
    features: dict[str, float]
    probability: float
    """The true chance that the trade closes in profit (what a perfect model would answer)."""
    outcome: int
    """1 when the trade closed in profit, else 0; drawn from `probability`."""
    hold_seconds: float
    """How long after opening the trade closes and its outcome is known."""


def profit_logit(features: npt.NDArray[np.float64], reversal: float = TODAY) -> npt.NDArray[np.float64]:
    """The log-odds that each trade (a row of indicators, columns in FEATURES order) closes in profit."""
    rsi, macd, volume_ratio, volatility, momentum = (features[:, column] for column in range(len(FEATURES)))
    stretch = (rsi - 50.0) / 15.0
    rsi_effect = np.where(np.abs(stretch) < 1.0, stretch, -2.5 * reversal * np.sign(stretch))
    volume_confirmed_macd = 2.5 * macd * np.tanh(3.0 * (volume_ratio - 1.0))
    return np.asarray(rsi_effect + volume_confirmed_macd + 0.5 * momentum - 0.8 * (volatility - 0.65), dtype=np.float64)


def sample_features(rng: np.random.Generator, n: int) -> npt.NDArray[np.float64]:
    """n rows of indicators, columns in FEATURES order."""
    return np.column_stack(
        [
            np.clip(rng.normal(50.0, 15.0, n), 1.0, 99.0),  # rsi
            rng.normal(0.0, 1.0, n),  # macd, in volatility units
            rng.lognormal(0.0, 0.35, n),  # volume_ratio: today's volume over the 20-day average
            rng.lognormal(-0.5, 0.4, n),  # volatility, annualised
            rng.normal(0.0, 1.0, n),  # momentum: 5-day return z-score
        ]
    )


def probability(features: npt.NDArray[np.float64], reversal: float = TODAY) -> npt.NDArray[np.float64]:
    """The true chance of profit for each row of `features` (columns in FEATURES order)."""
    return np.asarray(1.0 / (1.0 + np.exp(-profit_logit(features, reversal))), dtype=np.float64)


def history(n: int, *, reversal: float = TODAY, seed: int = 0) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    """n closed trades of a past window (features, outcomes) to train a model on."""
    rng = np.random.default_rng(seed)
    features = sample_features(rng, n)
    outcomes = (rng.uniform(size=n) < probability(features, reversal)).astype(np.int64)
    return features, outcomes


def log_loss(outcomes: Sequence[int] | npt.NDArray[np.int64], predicted: npt.NDArray[np.float64]) -> float:
    """Mean log loss, clipped like the analysis clips it (1e-15)."""
    p = np.clip(predicted, 1e-15, 1.0 - 1e-15)
    y = np.asarray(outcomes, dtype=np.float64)
    return float(np.mean(-(y * np.log(p) + (1.0 - y) * np.log(1.0 - p))))


class Market:
    """An endless stream of trades from `accounts` accounts, reproducible from `seed`."""

    def __init__(self, *, seed: int = 1, accounts: int = 5_000, prefix: str = "T", hold: tuple[float, float] = (1, 4)):
        self.rng = np.random.default_rng(seed)
        self.draw = random.Random(seed)
        self.accounts = accounts
        self.prefix = prefix
        self.hold = hold
        self.opened = 0
        self._buffer: list[Trade] = []

    def next_trade(self) -> Trade:
        if not self._buffer:
            self._buffer = self._batch(512)
        return self._buffer.pop()

    def _batch(self, n: int) -> list[Trade]:
        features = sample_features(self.rng, n)
        chances = probability(features)
        trades = []
        for row, chance in zip(features, chances, strict=True):
            self.opened += 1
            trades.append(
                Trade(
                    trade_id=f"{self.prefix}-{self.opened:07d}",
                    account=f"ACC-{self.draw.randrange(self.accounts):05d}",
                    features={name: round(float(value), 6) for name, value in zip(FEATURES, row, strict=True)},
                    probability=float(chance),
                    outcome=int(self.draw.random() < chance),
                    hold_seconds=self.draw.uniform(*self.hold),
                )
            )
        trades.reverse()  # popped from the end: trade ids go out in order
        return trades
