"""The three models of the demo, each a real scikit-learn estimator trained at start on the synthetic market.

- v1, in production: logistic regression on the five indicators. Linear, so it follows RSI upwards
  through the stretched band instead of expecting the reversal, and it cannot tell volume-confirmed
  MACD from noise.
- v2, the better candidate: gradient-boosted trees on the same indicators and the same window; they
  learn the RSI bands and the MACD-volume interaction (about a quarter lower log loss).
- v3, the worse candidate: the same trees, retrained on a window from a momentum regime, where
  stretched moves kept going. Confident, and wrong on every stretched trade today.

Training takes well under a second each, on 8,000 trades drawn from a fixed seed: every run serves
the same models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from trading import market

TRAINING_TRADES = 8_000
MOMENTUM_REGIME = -0.8
"""The window v3 was trained on: stretched RSI moves kept going (market.TODAY is +1)."""


class Classifier(Protocol):
    def fit(self, x: Any, y: Any) -> Any: ...
    def predict_proba(self, x: Any) -> Any: ...


@dataclass(frozen=True)
class Recipe:
    version: str
    """The model's version, as the ShadowDeployment names it."""
    description: str
    reversal: float
    """The regime of the window the model is trained on."""
    seed: int

    def estimator(self) -> Classifier:
        raise NotImplementedError


@dataclass(frozen=True)
class Logistic(Recipe):
    def estimator(self) -> Classifier:
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        model: Classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1_000))
        return model


@dataclass(frozen=True)
class BoostedTrees(Recipe):
    def estimator(self) -> Classifier:
        from sklearn.ensemble import HistGradientBoostingClassifier

        model: Classifier = HistGradientBoostingClassifier(max_iter=60, learning_rate=0.2, random_state=self.seed)
        return model


MODELS: dict[str, Recipe] = {
    "v1": Logistic("1.4.0", "logistic regression on rsi, macd, volume_ratio, volatility, momentum", market.TODAY, 11),
    "v2": BoostedTrees("2.0.0", "gradient-boosted trees on the same indicators and window", market.TODAY, 11),
    "v3": BoostedTrees("3.0.0", "gradient-boosted trees retrained on a momentum-regime window", MOMENTUM_REGIME, 12),
}


@dataclass(frozen=True)
class TrainedModel:
    name: str
    recipe: Recipe
    estimator: Classifier

    def predict(self, features: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """The chance of profit for each row (columns in market.FEATURES order)."""
        return np.asarray(self.estimator.predict_proba(features)[:, 1], dtype=np.float64)


def train(name: str) -> TrainedModel:
    """Fit model `name` (v1, v2 or v3) on its training window."""
    recipe = MODELS[name]
    features, outcomes = market.history(TRAINING_TRADES, reversal=recipe.reversal, seed=recipe.seed)
    estimator = recipe.estimator()
    estimator.fit(features, outcomes)
    return TrainedModel(name, recipe, estimator)
