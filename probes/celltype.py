"""Cell-type linear probe: standardised multinomial logistic regression, cross-validated (protocol §2.1).

Out-of-fold predictions are computed once per layer; the bootstrap resamples cells on them (the model is
not refitted per replicate), with the same resamples for every layer so layers can be compared pairwise.

``learner="sgd"`` is the incremental variant for stores too large to hold a layer in memory: a
``StandardScaler`` and an ``SGDClassifier(loss="log_loss")`` are fitted with ``partial_fit`` over the
layer's store chunks (``epochs`` passes in a seeded shuffled chunk order), on every cell outside the
held-out fold, and scored on the held-out fold; memory is one chunk, whatever the number of cells.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import scipy.sparse as sp
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, SGDClassifier
from sklearn.model_selection import cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from ..engine.errors import ProbeError
from .base import DEFAULT_BOOTSTRAP, DEFAULT_SEED, ContextPlan, LayerRows, Metric, MetricSpec, StreamingTask
from .confidence import bootstrap_indices
from .features import as_float32
from .labels import LabelTask, prepare_labels, splits_of
from .metrics import LABEL_METRICS, label_metrics
from .sampling import stratified_cap


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


def classification_specs(plan: ContextPlan, *, prefix: str = "", features: str = "std") -> list[MetricSpec]:
    """The metrics :func:`classification_metrics` returns for ``plan``."""
    n_boot = len(plan.reference["boot"])
    return [MetricSpec(prefix + name, plan.n_cells, n_boot, features) for name in LABEL_METRICS]


def linear_probe_predictions(X: np.ndarray, y: np.ndarray, folds: np.ndarray, *, C: float, seed: int) -> np.ndarray:
    """Out-of-fold labels of ``StandardScaler -> LogisticRegression(C, lbfgs, multinomial)``."""
    pipe = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=1000, random_state=seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return cross_val_predict(pipe, as_float32(X), y, cv=splits_of(folds))


@dataclass(frozen=True)
class CellTypeTask(LabelTask):
    """Linear probe of ``label_key`` (e.g. cell type) per context; grouped folds when ``group_key`` is set.

    Classes with fewer than ``min_cells_per_class`` cells are dropped (reported); at most
    ``max_per_class`` cells per class and ``max_cells`` in total are used (stratified, reported).
    ``C`` is fixed across layers. ``learner="sgd"`` streams every planned cell (set the caps to None to
    use all of them) with ``alpha`` regularisation; its baseline uses ``baseline_max_cells`` cells.
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
    learner: str = "logistic"
    epochs: int = 5
    alpha: float = 1e-4
    baseline_max_cells: int = 50_000
    n_boot: int = DEFAULT_BOOTSTRAP
    seed: int = DEFAULT_SEED

    def __new__(cls, *args: Any, **kwargs: Any) -> CellTypeTask:
        """``learner="sgd"`` builds a :class:`StreamingCellTypeTask` (same name, settings and cache key)."""
        if cls is CellTypeTask and _learner(args, kwargs) == "sgd":
            cls = StreamingCellTypeTask
        return object.__new__(cls)

    def __post_init__(self) -> None:
        if self.learner not in LEARNERS:
            raise ProbeError(f"cell_type learner must be one of {', '.join(LEARNERS)}, got {self.learner!r}")

    @property
    def primary_metric(self) -> str:
        return "macro_f1"

    def metric_specs(self, plan: ContextPlan) -> list[MetricSpec]:
        return classification_specs(plan)

    def evaluate(self, plan: ContextPlan, X: np.ndarray) -> list[Metric]:
        y_pred = linear_probe_predictions(X, plan.reference["y"], plan.reference["folds"], C=self.C, seed=self.seed)
        return classification_metrics(plan, y_pred)


@dataclass(frozen=True)
class StreamingCellTypeTask(CellTypeTask, StreamingTask):
    """The cell-type probe with ``learner="sgd"``: an incremental fit over each layer's store chunks.

    Built by ``CellTypeTask(learner="sgd")`` (or this class directly); the same settings, so the same
    results and cache keys. The baseline is the in-memory probe on ``baseline_max_cells`` cells.
    """

    learner: str = "sgd"

    def __post_init__(self) -> None:
        if self.learner != "sgd":
            raise ProbeError(
                f"StreamingCellTypeTask streams with learner='sgd', got {self.learner!r}; "
                "use CellTypeTask for the other learners"
            )

    def counts_rows(self, plan: ContextPlan) -> np.ndarray:
        labels = plan.obs[self.label_key].astype(str).to_numpy()
        pos, _ = stratified_cap(
            labels, max_per_class=None, max_total=self.baseline_max_cells, seed=plan.seed_for(self.seed, "baseline")
        )
        return pos

    def prepare(self, plan: ContextPlan, counts: sp.csr_matrix | None, var_names: Any) -> None:
        prepare_labels(plan, None, label_key=self.label_key, group_key=self.group_key, n_boot=0, seed=self.seed)
        test = np.flatnonzero(plan.reference["folds"] == 0)
        plan.reference["test"] = test
        plan.reference["test_boot"] = bootstrap_indices(len(test), self.n_boot, plan.seed_for(self.seed, "boot"))
        if counts is not None:  # the baseline: the in-memory probe on a capped subsample of the counts
            sub = self.counts_rows(plan)
            base = ContextPlan(self.name, plan.context, plan.rows[sub], plan.obs.iloc[sub], caps=dict(plan.caps))
            prepare_labels(
                base, counts, label_key=self.label_key, group_key=self.group_key, n_boot=self.n_boot, seed=self.seed
            )
            plan.reference["baseline_plan"] = base

    def metric_specs(self, plan: ContextPlan) -> list[MetricSpec]:
        """The held-out fold's metrics (:meth:`evaluate_stream`)."""
        n_test, n_boot = len(plan.reference["test"]), len(plan.reference["test_boot"])
        return [MetricSpec(name, n_test, n_boot) for name in LABEL_METRICS]

    def evaluate_baseline(self, plan: ContextPlan) -> list[Metric]:
        base = plan.reference["baseline_plan"]
        return self.evaluate(base, base.reference["baseline"])

    def evaluate_stream(self, plan: ContextPlan, rows: LayerRows) -> list[Metric]:
        """Incremental fit over the layer's chunks; metrics on the held-out fold (fold 0)."""
        y, folds = plan.reference["y"], plan.reference["folds"]
        train = folds != 0
        classes = np.unique(y)
        scaler = StandardScaler()
        for i in range(rows.n_chunks):
            pos, X = rows.chunk(i)
            if train[pos].any():
                scaler.partial_fit(X[train[pos]])
        clf = SGDClassifier(loss="log_loss", alpha=self.alpha, random_state=self.seed)
        rng = np.random.default_rng(plan.seed_for(self.seed, "sgd"))  # the same order for every layer
        for _ in range(self.epochs):
            for i in rng.permutation(rows.n_chunks):
                pos, X = rows.chunk(int(i))
                m = train[pos]
                if m.any():
                    shuffle = rng.permutation(int(m.sum()))
                    clf.partial_fit(scaler.transform(X[m])[shuffle], y[pos][m][shuffle], classes=classes)
        y_pred = np.empty(len(y), dtype=y.dtype)
        for i in range(rows.n_chunks):
            pos, X = rows.chunk(i)
            m = ~train[pos]
            if m.any():
                y_pred[pos[m]] = clf.predict(scaler.transform(X[m]))
        test = plan.reference["test"]
        values = label_metrics(y[test], y_pred[test])
        reps = label_metrics(y[test], y_pred[test], plan.reference["test_boot"])
        extra = {"n_train": float(train.sum()), "n_test": float(len(test)), "epochs": float(self.epochs)}
        return [
            Metric(plan.context, name, float(values[name][0]), len(test), replicates=reps[name], extra=dict(extra))
            for name in values
        ]


LEARNERS = ("logistic", "sgd")


def _learner(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The ``learner`` a ``CellTypeTask(*args, **kwargs)`` call asks for."""
    if "learner" in kwargs:
        return kwargs["learner"]
    names = [f.name for f in dataclasses.fields(CellTypeTask)]
    i = names.index("learner")
    return args[i] if len(args) > i else "logistic"
