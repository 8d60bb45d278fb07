"""The baselines that need optional installs: CellTypist (classification) and scVI (generation).

scvi-tools and CellTypist are heavy (``pip install -e ".[bench]"``); they are imported inside the functions
that need them, so this module imports without them. :data:`instructcell.evaluation.baselines.BASELINES`
runs them and records why they were skipped when they are missing.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import sys
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.linear_model import LogisticRegression

from .metrics.generation import normalize_log1p

__all__ = ["OneVsRestLogisticRegression", "ScviGenerator", "celltypist_predictions", "train_scvi"]


def _expressed_genes(*matrices: sp.spmatrix) -> np.ndarray:
    """Sorted indices of the genes with a non-zero count in any of the matrices."""
    return np.unique(np.concatenate([sp.csr_matrix(m).indices for m in matrices]))


# ---------------------------------------------------------------------------------------------- scVI
@dataclass
class ScviGenerator:
    """An scVI model trained with the cell label as its batch covariate, and what it was trained on.

    Attributes
    ----------
    model : scvi.model.SCVI
        The trained model.
    genes : numpy.ndarray
        Columns of the full gene vocabulary the model was trained on (genes with counts in training cells).
    n_genes : int
        Size of the full gene vocabulary.
    train_seconds : float
        Wall time of ``model.train``.
    epochs : int
        Epochs trained.
    final_elbo : float or None
        Training ELBO loss (per cell) of the last epoch, when scVI logged it.
    """

    model: Any
    genes: np.ndarray
    n_genes: int
    train_seconds: float
    epochs: int
    final_elbo: float | None = None

    @property
    def labels(self) -> list[str]:
        """Labels the model can generate (its batch categories)."""
        from scvi import REGISTRY_KEYS

        registry = self.model.adata_manager.get_state_registry(REGISTRY_KEYS.BATCH_KEY)
        return [str(label) for label in registry.categorical_mapping]

    @torch.inference_mode()
    def sample(self, requested: Mapping[str, int], seed: int = 0) -> tuple[sp.csr_matrix | None, list[str]]:
        """Sample new cells of the requested labels from scVI's generative model.

        For every cell: ``z ~ N(0, I)``; log library size ``l ~ N(mu_b, sigma_b^2)`` from the per-batch
        (= per-label) library prior that scVI fits on the training data; then counts
        ``x ~ ZINB(exp(l) * px_scale(z, b), theta, pi(z, b))`` from the decoder conditioned on the label
        ``b``. Only scVI's public ``module.generative`` is called; no real cell is encoded.

        Parameters
        ----------
        requested : mapping of str to int
            Cells per label (visited in sorted order); labels scVI was not trained on are left out.
        seed : int
            Seed of the draws (torch's global generator is restored afterwards).

        Returns
        -------
        counts : scipy.sparse.csr_matrix or None
            ``(n, n_genes)`` integer-valued float32 counts over the full gene vocabulary.
        labels : list of str
        """
        module = self.model.module
        module.eval()
        codes = {label: i for i, label in enumerate(self.labels)}
        blocks, labels = [], []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for label, n in sorted(requested.items()):
                if label not in codes or n < 1:
                    continue
                batch_index = torch.full((n, 1), codes[label], dtype=torch.long)
                z = torch.randn(n, module.n_latent)
                prior = module.generative(z=z, library=torch.zeros(n, 1), batch_index=batch_index)
                library = prior["pl"].sample()
                px = module.generative(z=z, library=library, batch_index=batch_index)["px"]
                sampled = px.sample().cpu().numpy().astype(np.float32)
                rows, cols = np.nonzero(sampled)
                blocks.append(
                    sp.csr_matrix((sampled[rows, cols], (rows, self.genes[cols])), shape=(n, self.n_genes))
                )
                labels += [label] * n
        return (sp.vstack(blocks).tocsr() if blocks else None), labels


def train_scvi(
    train_counts: sp.spmatrix | np.ndarray,
    train_labels: Sequence[str],
    max_epochs: int = 200,
    seed: int = 0,
    batch_size: int = 128,
    n_latent: int = 10,
    **model_kwargs: Any,
) -> ScviGenerator:
    """Train ``scvi.model.SCVI`` on the training cells with the label as the batch covariate.

    The label is registered as scVI's batch key, so the decoder and the library-size prior are conditioned
    on it (``use_observed_lib_size=False`` keeps a per-label prior of the library size to sample from).
    Genes without a count in any training cell are left out of the model (their generated counts are 0).
    All training cells are used (``train_size=1.0``); CPU, no progress bar, no checkpoints.

    Parameters
    ----------
    train_counts : scipy.sparse matrix or numpy.ndarray, shape (n_train, n_genes)
        Raw training counts.
    train_labels : sequence of str, length n_train
    max_epochs : int
        Training epochs (scvi-tools' own default is ``min(400, 20000 / n_cells * 400)``).
    seed : int
        ``scvi.settings.seed``.
    batch_size, n_latent : int
        Minibatch size and latent dimension (scVI's defaults).
    **model_kwargs
        More ``scvi.model.SCVI`` arguments (``n_hidden``, ``n_layers``, ``gene_likelihood``, ...).

    Returns
    -------
    ScviGenerator
    """
    import anndata
    import pandas as pd
    import scvi

    counts = sp.csr_matrix(train_counts, dtype=np.float32)
    if len(train_labels) != counts.shape[0]:
        raise ValueError(f"Got {len(train_labels)} labels for {counts.shape[0]} training cells.")
    if max_epochs < 1:
        raise ValueError(f"max_epochs must be at least 1, got {max_epochs}.")
    genes = _expressed_genes(counts)
    adata = anndata.AnnData(
        X=counts[:, genes],
        obs=pd.DataFrame(
            {"label": pd.Categorical(np.asarray(train_labels).astype(str))},
            index=[str(i) for i in range(counts.shape[0])],
        ),
        var=pd.DataFrame(index=[str(g) for g in genes]),
    )
    scvi.settings.seed = seed
    for name in ("scvi", "lightning", "lightning.pytorch", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    scvi.model.SCVI.setup_anndata(adata, batch_key="label")
    options = {"use_observed_lib_size": False, "gene_likelihood": "zinb", **model_kwargs}
    model = scvi.model.SCVI(adata, n_latent=n_latent, **options)
    start = time.perf_counter()
    model.train(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        train_size=1.0,
        batch_size=batch_size,
        enable_progress_bar=False,
        enable_checkpointing=False,
    )
    seconds = time.perf_counter() - start
    history = model.history.get("elbo_train")
    final_elbo = float(history.iloc[-1, 0]) if history is not None and len(history) else None
    return ScviGenerator(model, genes, counts.shape[1], seconds, max_epochs, final_elbo)


# ---------------------------------------------------------------------------------------- CellTypist
class OneVsRestLogisticRegression(LogisticRegression):
    """``LogisticRegression(multi_class="ovr")`` for scikit-learn >= 1.8, where that option is gone.

    One binary L2 logistic regression per class (the class against the rest), stacked into ``coef_`` and
    ``intercept_``: what CellTypist trains. With two classes it is the ordinary binary model.
    """

    def __init__(
        self,
        C: float = 1.0,
        solver: str = "lbfgs",
        max_iter: int = 100,
        multi_class: str = "ovr",
        n_jobs: int | None = None,
        random_state: int | None = None,
    ) -> None:
        super().__init__(C=C, solver=solver, max_iter=max_iter, random_state=random_state)
        self.multi_class = multi_class
        self.n_jobs = n_jobs  # accepted for CellTypist's call; the binary fits run one after the other

    def fit(self, X: Any, y: Sequence[Any], sample_weight: Any = None) -> OneVsRestLogisticRegression:
        """Fit one binary model per class (with two classes: one model, for the second class)."""
        if self.multi_class != "ovr":
            raise ValueError(f"Only multi_class='ovr' is supported, got {self.multi_class!r}.")
        y = np.asarray(y)
        classes = np.unique(y)
        if classes.size < 2:
            raise ValueError(f"Need at least 2 classes to fit, got {classes.tolist()}.")
        fits = [
            LogisticRegression(
                C=self.C, solver=self.solver, max_iter=self.max_iter, random_state=self.random_state
            ).fit(X, (y == label).astype(int), sample_weight=sample_weight)
            for label in (classes[1:] if classes.size == 2 else classes)
        ]
        self.classes_ = classes
        self.coef_ = np.vstack([f.coef_ for f in fits])
        self.intercept_ = np.concatenate([f.intercept_ for f in fits])
        self.n_iter_ = np.concatenate([f.n_iter_ for f in fits])
        self.n_features_in_ = X.shape[1]
        return self


@contextlib.contextmanager
def _celltypist_logistic_regression() -> Iterator[None]:
    """Let ``celltypist.train`` build its one-vs-rest model on scikit-learn versions without ``multi_class``.

    CellTypist 1.7.1 calls ``LogisticRegression(..., multi_class="ovr")``, which scikit-learn 1.8 removed
    (TypeError). While the context is open, ``celltypist.train``'s module uses
    :class:`OneVsRestLogisticRegression` instead; nothing changes where scikit-learn still has the option.
    """
    import celltypist.train  # noqa: F401  (the module, for its LogisticRegression name)

    module = sys.modules["celltypist.train"]
    if "multi_class" in inspect.signature(LogisticRegression).parameters:
        yield
        return
    original = module.LogisticRegression
    module.LogisticRegression = OneVsRestLogisticRegression
    try:
        yield
    finally:
        module.LogisticRegression = original


def celltypist_predictions(
    train_counts: sp.spmatrix,
    train_labels: Sequence[str],
    test_counts: sp.spmatrix,
    gene_names: Sequence[str],
    use_sgd: bool = False,
    seed: int = 0,
) -> list[str]:
    """Train a CellTypist model on the training cells (``celltypist.train``) and label the test cells.

    Both sets are log-normalized to 1e4 counts per cell (CellTypist's expected input). Genes without a count
    in any training or test cell are dropped first (zero in every cell: the normalization and the fit do
    not change, training is faster).

    Parameters
    ----------
    train_counts, test_counts : scipy.sparse matrix, shape (n, n_genes)
        Raw counts over the same genes.
    train_labels : sequence of str
    gene_names : sequence of str, length n_genes
    use_sgd : bool
        CellTypist's SGD logistic regression instead of its default (one-vs-rest L2 logistic regression).
    seed : int
        Seed of numpy's global generator (CellTypist samples with it) and of the SGD classifier.

    Returns
    -------
    list of str
        CellTypist's best-match label of every test cell (no majority voting).
    """
    import anndata
    import pandas as pd

    with warnings.catch_warnings():  # celltypist reads scanpy.__version__ (FutureWarning) on import
        warnings.simplefilter("ignore", FutureWarning)
        import celltypist

    train = sp.csr_matrix(train_counts, dtype=np.float32)
    test = sp.csr_matrix(test_counts, dtype=np.float32)
    if train.shape[1] != test.shape[1] or train.shape[1] != len(gene_names):
        raise ValueError(
            f"train ({train.shape[1]}), test ({test.shape[1]}) and gene_names ({len(gene_names)}) must have "
            "the same genes."
        )
    genes = _expressed_genes(train, test)
    names = pd.Index([str(g) for g in np.asarray(gene_names)[genes]])

    def as_adata(counts: sp.csr_matrix, labels: Sequence[str] | None = None) -> anndata.AnnData:
        obs = pd.DataFrame(index=[str(i) for i in range(counts.shape[0])])
        if labels is not None:
            obs["label"] = np.asarray(labels).astype(str)
        return anndata.AnnData(X=normalize_log1p(counts)[:, genes], obs=obs, var=pd.DataFrame(index=names))

    logging.getLogger("celltypist").setLevel(logging.WARNING)
    np.random.seed(seed)
    kwargs = {"random_state": seed} if use_sgd else {}
    with _celltypist_logistic_regression():
        model = celltypist.train(
            as_adata(train, train_labels), labels="label", use_SGD=use_sgd, n_jobs=1, **kwargs
        )
    result = celltypist.annotate(as_adata(test), model=model, majority_voting=False)
    return [str(label) for label in result.predicted_labels["predicted_labels"]]
