"""Light stand-ins shared by tests (no numba start-up, no downloads)."""

import numpy as np


class PCAEmbedding:
    """Stand-in for the PCA + UMAP embedding of the generation metrics: a 2-component PCA of log1p counts."""

    def fit(self, counts):
        x = np.log1p(_dense(counts))
        self.mean_ = x.mean(0)
        _, _, vt = np.linalg.svd(x - self.mean_, full_matrices=False)
        self.components_ = vt[:2]
        self.real_embedding_ = self.transform(counts)
        return self

    def transform(self, counts):
        return (np.log1p(_dense(counts)) - self.mean_) @ self.components_.T


def _dense(counts):
    return np.asarray(counts.toarray() if hasattr(counts, "toarray") else counts, dtype=float)
