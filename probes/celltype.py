"""Cell-type linear probe: standardised multinomial logistic regression, cross-validated (protocol §2.1).

Out-of-fold predictions are computed once per layer; the bootstrap resamples cells on them (the model is
not refitted per replicate), with the same resamples for every layer so layers can be compared pairwise.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from .base import DEFAULT_BOOTSTRAP, DEFAULT_SEED, ContextPlan, Metric, Task
from .features import as_float32
from .labels import plan_labels, prepare_labels, splits_of
from .metrics import label_metrics


def classification_metrics(
    plan: ContextPlan, y_pred: np.ndarray, *, prefix: str = "", features: str = "std"
) -> list[Metric]:
    """Macro-F1, balanced accuracy and accuracy of out-of-fold predictions, with paired bootstrap CIs.

    ``extra`` holds the mean and sd over the test folds (the protocol's "mean +- sd over folds").
    """
    y, folds, boot = plan.reference["y"], plan.reference["folds"], plan.reference["boot"]
    values = label_metrics(y, y_pred)
    reps = label_metrics(y, y_pred, boot)
    per_fold = [label_metrics(y[folds == k], y_pred[folds == k]) for k in np.unique(folds)]
    out = []
    for name in values:
        fold_values = [float(f[name][0]) for f in per_fold]
        out.append(
            Metric(
                context=plan.context,
                metric=prefix + name,
                value=float(values[name][0]),
                n_cells=plan.n_cells,
                replicates=reps[name],
                features=features,
                extra={"fold_mean": float(np.mean(fold_values)), "fold_sd": float(np.std(fold_values, ddof=1))},
            )
        )
    return out


def linear_probe_predictions(X: np.ndarray, y: np.ndarray, folds: np.ndarray, *, C: float, seed: int) -> np.ndarray:
    """Out-of-fold labels of ``StandardScaler -> LogisticRegression(C, lbfgs, multinomial)``."""
    pipe = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=1000, random_state=seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return cross_val_predict(pipe, as_float32(X), y, cv=splits_of(folds))


@dataclass(frozen=True)
class CellTypeTask(Task):
    """Linear probe of ``label_key`` (e.g. cell type) per context; grouped folds when ``group_key`` is set.

    Classes with fewer than ``min_cells_per_class`` cells are dropped (reported); at most
    ``max_per_class`` cells per class and ``max_cells`` in total are used (stratified, reported).
    ``C`` is fixed across layers.
    """

    name: ClassVar[str] = "cell_type"

    label_key: str = "cell_type"
    context_key: str | None = None
    group_key: str | None = None
    n_folds: int = 5
    min_cells_per_class: int = 10
    max_per_class: int | None = 2000
    max_cells: int | None = 200_000
    C: float = 1.0
    n_boot: int = DEFAULT_BOOTSTRAP
    seed: int = DEFAULT_SEED

    @property
    def primary_metric(self) -> str:
        return "macro_f1"

    def required_columns(self) -> list[str]:
        return [c for c in (self.label_key, self.context_key, self.group_key) if c]

    def plan(self, obs: pd.DataFrame, *, chunk_cells: int) -> list[ContextPlan]:
        return plan_labels(
            self.name,
            obs,
            label_key=self.label_key,
            context_key=self.context_key,
            group_key=self.group_key,
            min_cells_per_class=self.min_cells_per_class,
            max_per_class=self.max_per_class,
            max_cells=self.max_cells,
            seed=self.seed,
            n_folds=self.n_folds,
        )

    def prepare(self, plan: ContextPlan, counts: sp.csr_matrix | None, var_names: Any) -> None:
        prepare_labels(
            plan, counts, label_key=self.label_key, group_key=self.group_key, n_boot=self.n_boot, seed=self.seed
        )

    def evaluate(self, plan: ContextPlan, X: np.ndarray) -> list[Metric]:
        y_pred = linear_probe_predictions(X, plan.reference["y"], plan.reference["folds"], C=self.C, seed=self.seed)
        return classification_metrics(plan, y_pred)
