"""Conditional VAE with a zero-inflated negative binomial (ZINB) likelihood: InstructCell's cell generator.

The language model's hidden state at the ``<SIGNAL>`` token is mapped to continuous covariates, which
condition an scVI-style variational autoencoder over raw gene counts. Training maximises the ELBO of the
observed counts; at generation time ``z ~ N(0, I)`` and a log library size are decoded into ZINB parameters,
from which counts are drawn. A target can also be a transformed copy of a *source* cell (perturbation
response: a control cell in, its perturbed counterpart out): then ``z`` is encoded from the source under the
same condition and the source's observed library is used, in training and in sampling (style transfer).

The architecture reproduces the original InstructCell generator (zjunlp/InstructCell, ``scvi``-derived CVAE)
so that original checkpoints load into it with a key map. The ZINB likelihood is always evaluated in float32,
also when the module runs in bfloat16: every tensor that leaves a linear layer for the likelihood is cast at
that boundary.

One cohesive file, as scvi-tools' module and distribution code it mirrors: the ZINB/NB likelihoods and their
Distribution, the encoder/decoder blocks and the conditional VAE that uses them. This file is Hugging Face
remote code: it imports only ``torch`` and the standard library.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Distribution, Normal, constraints, kl_divergence

POISSON_RATE_MAX = 1e8
"""Upper clamp of the Gamma draw before it is used as a Poisson rate (as in the original)."""

VAR_EPS = 1e-4
"""Added to ``exp(.)`` of the variance heads so that posterior variances stay positive."""


# ------------------------------------------------------------------------------------------------------------
# Likelihoods
# ------------------------------------------------------------------------------------------------------------
def log_nb_positive(
    x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, eps: float = 1e-8
) -> torch.Tensor:
    """Log-likelihood of counts under a negative binomial with mean ``mu`` and inverse dispersion ``theta``.

    ``log NB(x; mu, theta) = theta log(theta / (theta + mu)) + x log(mu / (theta + mu))
    + lgamma(x + theta) - lgamma(theta) - lgamma(x + 1)``, with ``eps`` inside every log.

    Parameters
    ----------
    x
        Observed counts, any shape broadcastable with ``mu`` and ``theta``, e.g. ``(n_cells, n_genes)``.
    mu
        Mean, ``>= 0``, e.g. ``(n_cells, n_genes)``.
    theta
        Inverse dispersion, ``> 0``, e.g. ``(n_genes,)`` or ``(n_cells, n_genes)``.
    eps
        Numerical-stability constant added inside the logarithms.

    Returns
    -------
    torch.Tensor
        Element-wise log-likelihood with the broadcast shape of the inputs, e.g. ``(n_cells, n_genes)``.
    """
    log_theta_mu = torch.log(theta + mu + eps)
    return (
        theta * (torch.log(theta + eps) - log_theta_mu)
        + x * (torch.log(mu + eps) - log_theta_mu)
        + torch.lgamma(x + theta)
        - torch.lgamma(theta)
        - torch.lgamma(x + 1)
    )


def log_zinb_positive(
    x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, zi_logits: torch.Tensor, eps: float = 1e-8
) -> torch.Tensor:
    """Log-likelihood of counts under a zero-inflated negative binomial, computed in log space.

    With ``pi = sigmoid(zi_logits)`` the probability of an extra zero:

    * ``x = 0``: ``log(pi + (1 - pi) NB(0)) = logaddexp(zi_logits, log NB(0)) - softplus(zi_logits)``;
    * ``x > 0``: ``log(1 - pi) + log NB(x) = log NB(x) - softplus(zi_logits)``.

    No sigmoid is ever passed to a log, so large ``|zi_logits|`` stay exact; ``zi_logits = -inf`` gives the
    plain negative binomial.

    Parameters
    ----------
    x
        Observed counts, e.g. ``(n_cells, n_genes)``.
    mu
        Mean of the negative-binomial component, ``>= 0``, e.g. ``(n_cells, n_genes)``.
    theta
        Inverse dispersion, ``> 0``, e.g. ``(n_genes,)`` or ``(n_cells, n_genes)``.
    zi_logits
        Logits of the zero-inflation probability, e.g. ``(n_cells, n_genes)``.
    eps
        Numerical-stability constant added inside the negative-binomial logarithms.

    Returns
    -------
    torch.Tensor
        Element-wise log-likelihood with the broadcast shape of the inputs, e.g. ``(n_cells, n_genes)``.
    """
    log_nb = log_nb_positive(x, mu, theta, eps=eps)
    log_nb_zero = theta * (torch.log(theta + eps) - torch.log(theta + mu + eps))
    log_zero = torch.logaddexp(zi_logits, log_nb_zero)
    return torch.where(x < eps, log_zero, log_nb) - F.softplus(zi_logits)


class ZeroInflatedNegativeBinomial(Distribution):
    """Zero-inflated negative binomial, parameterized by mean, inverse dispersion and zero-inflation logits.

    Parameters
    ----------
    mu
        Mean of the negative-binomial component, ``>= 0``, e.g. ``(n_cells, n_genes)``.
    theta
        Inverse dispersion, ``> 0``, broadcastable with ``mu`` (e.g. ``(n_genes,)``); stored broadcast.
    zi_logits
        Logits of the zero-inflation probability, broadcastable with ``mu``.
    scale
        Optional normalized expression (``mu`` divided by the size factor), e.g. ``(n_cells, n_genes)``.
        Stored for the caller; it does not enter the likelihood.
    validate_args
        Check parameter constraints (and ``log_prob`` values) and raise ``ValueError`` on violations. ``None``
        uses torch's global default.

    Notes
    -----
    ``mean = (1 - pi) mu`` and ``variance = (1 - pi)(mu + mu^2 / theta) + pi (1 - pi) mu^2`` with
    ``pi = sigmoid(zi_logits)``. ``sample`` draws Gamma, then Poisson, then uniform noise, in that order.
    """

    support = constraints.nonnegative_integer
    has_rsample = False

    def __init__(
        self,
        mu: torch.Tensor,
        theta: torch.Tensor,
        zi_logits: torch.Tensor,
        scale: torch.Tensor | None = None,
        validate_args: bool | None = None,
    ) -> None:
        try:
            self.mu, self.theta, self.zi_logits = torch.broadcast_tensors(mu, theta, zi_logits)
        except RuntimeError as error:
            raise ValueError(
                f"mu {tuple(mu.shape)}, theta {tuple(theta.shape)} and zi_logits {tuple(zi_logits.shape)} "
                "must broadcast to one shape, e.g. mu and zi_logits (n_cells, n_genes) with theta (n_genes,)."
            ) from error
        self.scale = scale
        super().__init__(batch_shape=self.mu.shape, validate_args=validate_args)

    @property
    def arg_constraints(self) -> dict[str, constraints.Constraint]:
        """Constraints checked when ``validate_args`` is on (``scale`` only when given)."""
        checks = {
            "mu": constraints.greater_than_eq(0),
            "theta": constraints.positive,
            "zi_logits": constraints.real,
        }
        if self.scale is not None:
            checks["scale"] = constraints.greater_than_eq(0)
        return checks

    @property
    def zi_probs(self) -> torch.Tensor:
        """Zero-inflation probability ``sigmoid(zi_logits)``, shape ``batch_shape``."""
        return torch.sigmoid(self.zi_logits)

    @property
    def mean(self) -> torch.Tensor:
        """Mean ``(1 - pi) mu``, shape ``batch_shape``."""
        return torch.sigmoid(-self.zi_logits) * self.mu

    @property
    def variance(self) -> torch.Tensor:
        """Variance ``(1 - pi)(mu + mu^2 / theta) + pi (1 - pi) mu^2``, shape ``batch_shape``."""
        keep = torch.sigmoid(-self.zi_logits)
        return keep * (self.mu + self.mu**2 / self.theta) + self.zi_probs * keep * self.mu**2

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """Log-probability of counts.

        Parameters
        ----------
        value
            Non-negative integer counts broadcastable with ``batch_shape``, e.g. ``(n_cells, n_genes)``.

        Returns
        -------
        torch.Tensor
            Element-wise log-probability, the broadcast shape of ``value`` and ``batch_shape``.
        """
        if self._validate_args:
            self._validate_sample(value)
        return log_zinb_positive(value, self.mu, self.theta, self.zi_logits)

    def sample(
        self, sample_shape: torch.Size | tuple[int, ...] = (), generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Draw counts: ``Gamma(theta, theta / mu)`` -> ``Poisson`` -> zero where ``uniform <= pi``.

        The random draws happen in this order, each over the full output shape: one standard-Gamma draw,
        one Poisson draw (its rate clamped to ``[tiny, 1e8]``), one uniform draw. This is the order of the
        original InstructCell generator, so a seeded generator reproduces its samples.

        Parameters
        ----------
        sample_shape
            Leading sample dimensions.
        generator
            Optional random generator on the parameters' device; ``None`` uses torch's global generator.

        Returns
        -------
        torch.Tensor
            Integer-valued counts of the parameters' dtype, shape ``sample_shape + batch_shape``.
        """
        shape = self._extended_shape(torch.Size(sample_shape))
        with torch.no_grad():
            gamma_rate = self.theta / self.mu
            rate = torch._standard_gamma(self.theta.expand(shape), generator=generator) / gamma_rate.expand(
                shape
            )
            rate.clamp_(min=torch.finfo(rate.dtype).tiny, max=POISSON_RATE_MAX)
            counts = torch.poisson(rate, generator=generator)
            uniform = torch.rand(shape, generator=generator, dtype=counts.dtype, device=counts.device)
            return counts.masked_fill(uniform <= self.zi_probs, 0.0)


# ------------------------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------------------------
class FullyConnectedLayer(nn.Module):
    """``Linear -> LayerNorm (no affine parameters, optional) -> GELU -> Dropout (optional)``.

    Parameters
    ----------
    n_in
        Input features.
    n_out
        Output features.
    use_layer_norm
        Apply a LayerNorm without learnable parameters after the linear layer.
    dropout_rate
        Dropout probability after the activation; ``0`` means no dropout module.
    """

    def __init__(self, n_in: int, n_out: int, use_layer_norm: bool, dropout_rate: float) -> None:
        super().__init__()
        self.linear = nn.Linear(n_in, n_out)
        self.norm = nn.LayerNorm(n_out, elementwise_affine=False) if use_layer_norm else nn.Identity()
        self.activation = nn.GELU()
        self.dropout = nn.Dropout(dropout_rate) if dropout_rate > 0 else nn.Identity()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Map ``(n_cells, n_in)`` to ``(n_cells, n_out)``."""
        return self.dropout(self.activation(self.norm(self.linear(hidden))))


class FullyConnectedLayers(nn.Sequential):
    """Stack of :class:`FullyConnectedLayer`; covariates are concatenated to the first layer's input only.

    Parameters
    ----------
    n_in
        Features of the main input.
    n_covariates
        Features of the covariates appended to the main input.
    n_hidden
        Width of every layer.
    n_layers
        Number of layers.
    use_layer_norm
        Affine-free LayerNorm in every layer.
    dropout_rate
        Dropout probability in every layer.
    """

    def __init__(
        self,
        n_in: int,
        n_covariates: int,
        n_hidden: int,
        n_layers: int,
        use_layer_norm: bool,
        dropout_rate: float,
    ) -> None:
        widths = [n_in + n_covariates] + [n_hidden] * n_layers
        super().__init__(
            *(
                FullyConnectedLayer(n_from, n_to, use_layer_norm, dropout_rate)
                for n_from, n_to in zip(widths[:-1], widths[1:], strict=True)
            )
        )

    def forward(self, x: torch.Tensor, covariates: torch.Tensor) -> torch.Tensor:
        """Run the stack on ``x ++ covariates``.

        Parameters
        ----------
        x
            Main input, ``(n_cells, n_in)``, any floating dtype (cast to the weights' dtype).
        covariates
            ``(n_cells, n_covariates)``.

        Returns
        -------
        torch.Tensor
            ``(n_cells, n_hidden)`` in the weights' dtype.
        """
        dtype = self[0].linear.weight.dtype
        hidden = torch.cat([x.to(dtype), covariates.to(dtype)], dim=-1)
        for layer in self:
            hidden = layer(hidden)
        return hidden


class Encoder(nn.Module):
    """Gaussian posterior ``q(. | x, covariates)``: MLP, then mean and variance heads.

    Parameters
    ----------
    n_input
        Features of the main input (genes).
    n_output
        Dimensionality of the latent variable.
    n_covariates
        Features of the covariates appended to the input of the first layer.
    n_hidden
        Width of the hidden layers.
    n_layers
        Number of hidden layers.
    use_layer_norm
        Affine-free LayerNorm in every hidden layer.
    dropout_rate
        Dropout probability in every hidden layer.
    """

    def __init__(
        self,
        n_input: int,
        n_output: int,
        n_covariates: int,
        n_hidden: int,
        n_layers: int,
        use_layer_norm: bool,
        dropout_rate: float,
    ) -> None:
        super().__init__()
        self.layers = FullyConnectedLayers(
            n_input, n_covariates, n_hidden, n_layers, use_layer_norm, dropout_rate
        )
        self.mean_encoder = nn.Linear(n_hidden, n_output)
        self.var_encoder = nn.Linear(n_hidden, n_output)

    def forward(
        self, x: torch.Tensor, covariates: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode and draw a reparameterized sample.

        Parameters
        ----------
        x
            ``(n_cells, n_input)``.
        covariates
            ``(n_cells, n_covariates)``.

        Returns
        -------
        q_m
            Posterior mean, ``(n_cells, n_output)``, float32.
        q_v
            Posterior variance ``exp(.) + 1e-4``, ``(n_cells, n_output)``, float32.
        z
            ``rsample`` of ``Normal(q_m, sqrt(q_v))``, ``(n_cells, n_output)``, float32.
        """
        hidden = self.layers(x, covariates)
        q_m = self.mean_encoder(hidden).float()
        q_v = torch.exp(self.var_encoder(hidden).float()) + VAR_EPS
        return q_m, q_v, Normal(q_m, q_v.sqrt()).rsample()


class Decoder(nn.Module):
    """ZINB parameters from a latent code and covariates (no dropout).

    Parameters
    ----------
    n_latent
        Dimensionality of ``z``.
    n_genes
        Number of genes.
    n_covariates
        Features of the covariates appended to ``z``.
    n_hidden
        Width of the hidden layers.
    n_layers
        Number of hidden layers.
    use_layer_norm
        Affine-free LayerNorm in every hidden layer.
    """

    def __init__(
        self,
        n_latent: int,
        n_genes: int,
        n_covariates: int,
        n_hidden: int,
        n_layers: int,
        use_layer_norm: bool,
    ) -> None:
        super().__init__()
        self.layers = FullyConnectedLayers(n_latent, n_covariates, n_hidden, n_layers, use_layer_norm, 0.0)
        self.scale_head = nn.Linear(n_hidden, n_genes)
        self.dropout_head = nn.Linear(n_hidden, n_genes)

    def forward(
        self, z: torch.Tensor, covariates: torch.Tensor, size_factor_log: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decode.

        Parameters
        ----------
        z
            ``(n_cells, n_latent)``.
        covariates
            ``(n_cells, n_covariates)``.
        size_factor_log
            Natural-log size factor, ``(n_cells, 1)``.

        Returns
        -------
        px_scale
            Normalized expression, softmax over genes, ``(n_cells, n_genes)``, float32.
        px_rate
            ZINB mean ``exp(size_factor_log) * px_scale``, ``(n_cells, n_genes)``, float32.
        px_dropout
            Zero-inflation logits, ``(n_cells, n_genes)``, float32.
        """
        hidden = self.layers(z, covariates)
        px_scale = torch.softmax(self.scale_head(hidden).float(), dim=-1)
        px_rate = torch.exp(size_factor_log.float()) * px_scale
        return px_scale, px_rate, self.dropout_head(hidden).float()


# ------------------------------------------------------------------------------------------------------------
# Conditional VAE
# ------------------------------------------------------------------------------------------------------------
class _VAEKeys(NamedTuple):
    qz: str = "qz"
    ql: str = "ql"
    z: str = "z"
    library: str = "library"
    pz: str = "pz"
    pl: str = "pl"
    px: str = "px"
    size_factor_log: str = "size_factor_log"
    has_source: str = "has_source"


VAE_KEYS = _VAEKeys()
"""Keys of the dicts returned by ``inference`` (qz, ql, z, library, has_source) and ``generative`` (px, pz,
pl, size_factor_log)."""


@dataclass
class VAELossOutput:
    """Negative ELBO and its terms.

    Attributes
    ----------
    loss
        Scalar: mean over cells of ``reconstruction_loss + kl_weight * kl_z + kl_library``.
    reconstruction_loss
        ZINB negative log-likelihood summed over genes, ``(n_cells,)``.
    kl_z
        ``KL(q(z | x, c) || N(0, I))`` summed over latent dimensions, ``(n_cells,)``.
    kl_library
        ``KL(q(l | x, c) || p(l))`` for the log library size, ``(n_cells,)``.
    kl_weight
        Weight applied to ``kl_z`` in ``loss``.
    """

    loss: torch.Tensor
    reconstruction_loss: torch.Tensor
    kl_z: torch.Tensor
    kl_library: torch.Tensor
    kl_weight: float

    def means(self) -> dict[str, torch.Tensor]:
        """Scalar (0-d) summaries for logging: ``loss`` and the per-cell terms averaged over cells."""
        return {
            "loss": self.loss,
            "reconstruction_loss": self.reconstruction_loss.mean(),
            "kl_z": self.kl_z.mean(),
            "kl_library": self.kl_library.mean(),
        }


def _check_positive_int(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}.")


def _check_matrix(name: str, tensor: torch.Tensor, n_rows: int | None, n_cols: int, columns: str) -> None:
    """Raise ``ValueError`` unless ``tensor`` is a 2-D ``(n_rows, n_cols)`` tensor (``n_rows=None``: any)."""
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != 2:
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ValueError(f"{name} must be a 2-D tensor (n_cells, {columns}), got {shape}.")
    if tensor.shape[1] != n_cols:
        raise ValueError(
            f"{name} has {tensor.shape[1]} columns but the VAE expects {n_cols} ({columns}), "
            f"shape {tuple(tensor.shape)}."
        )
    if n_rows is not None and tensor.shape[0] != n_rows:
        raise ValueError(
            f"{name} has {tensor.shape[0]} rows but the counts have {n_rows} cells: pass one row per cell."
        )


def _check_counts(counts: torch.Tensor, n_genes: int) -> torch.Tensor:
    """Validate raw counts ``(n_cells, n_genes)`` and return them as float32."""
    _check_matrix("counts", counts, None, n_genes, "n_genes, in the model's gene order")
    counts = counts.float()
    if not torch.isfinite(counts).all():
        raise ValueError("counts contain NaN or inf; pass raw UMI/read counts.")
    if (counts < 0).any():
        raise ValueError("counts contain negative values; pass raw counts, not scaled or centred data.")
    if (counts != counts.round()).any():
        raise ValueError(
            "counts contain non-integer values; pass raw counts (e.g. adata.layers['counts']), not "
            "normalized or log-transformed data: the ZINB likelihood is defined on integers."
        )
    return counts


def _log_library(counts: torch.Tensor) -> torch.Tensor:
    """Natural-log total counts ``(n_cells, 1)`` of raw counts ``(n_cells, n_genes)`` (at least log 1)."""
    return torch.log(counts.float().sum(dim=-1, keepdim=True).clamp_min(1.0))


class InstructCellConditionalVAE(nn.Module):
    """scVI-style conditional VAE with a ZINB likelihood, conditioned on a language-model hidden state.

    ``condition_mapping`` turns the ``<SIGNAL>`` hidden state ``(n_cells, condition_dim)`` into continuous
    covariates ``c`` of size ``n_condition``. Covariates are concatenated to the input of the first layer of
    every network (``z_encoder``, ``l_encoder``, ``decoder``, ``library_head``).

    Parameters
    ----------
    n_genes
        Number of genes (columns of the count matrix).
    condition_dim
        Size of the conditioning hidden state (the language model's ``d_model``).
    n_latent
        Dimensionality of ``z``.
    n_hidden
        Width of the encoder and decoder hidden layers.
    n_layers
        Hidden layers of ``z_encoder`` and ``decoder`` (``l_encoder`` always has one).
    n_condition
        Size of the mapped covariates.
    dropout_rate
        Dropout in the encoders and the adaptive library head (the decoder has none).
    use_layer_norm
        Affine-free LayerNorm after every hidden linear layer.
    adaptive_library
        Replace the log library with ``library_head(log library ++ c)`` as the decoder's log size factor.
    library_hidden
        Hidden width of ``library_head`` (128 in the published InstructCell checkpoints).
    log_variational
        Feed ``log1p(counts)`` instead of raw counts to the encoders.

    Notes
    -----
    The log-library prior ``Normal(library_log_mean, sqrt(library_log_var))`` lives in buffers; set it from
    the training counts with :meth:`set_library_prior`. The original InstructCell training used
    ``kl_weight=3.0``.
    """

    def __init__(
        self,
        n_genes: int,
        condition_dim: int,
        n_latent: int = 256,
        n_hidden: int = 1024,
        n_layers: int = 4,
        n_condition: int = 256,
        dropout_rate: float = 0.1,
        use_layer_norm: bool = True,
        adaptive_library: bool = True,
        library_hidden: int = 128,
        log_variational: bool = True,
    ) -> None:
        super().__init__()
        for name, value in [
            ("n_genes", n_genes),
            ("condition_dim", condition_dim),
            ("n_latent", n_latent),
            ("n_hidden", n_hidden),
            ("n_layers", n_layers),
            ("n_condition", n_condition),
            ("library_hidden", library_hidden),
        ]:
            _check_positive_int(name, value)
        if not 0.0 <= dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate!r}.")
        self.n_genes = n_genes
        self.condition_dim = condition_dim
        self.n_latent = n_latent
        self.n_condition = n_condition
        self.adaptive_library = adaptive_library
        self.log_variational = log_variational

        self.condition_mapping = nn.Linear(condition_dim, n_condition)
        self.z_encoder = Encoder(
            n_genes, n_latent, n_condition, n_hidden, n_layers, use_layer_norm, dropout_rate
        )
        self.l_encoder = Encoder(n_genes, 1, n_condition, n_hidden, 1, use_layer_norm, dropout_rate)
        self.decoder = Decoder(n_latent, n_genes, n_condition, n_hidden, n_layers, use_layer_norm)
        self.px_r = nn.Parameter(torch.randn(n_genes))
        self.library_head = (
            nn.Sequential(
                nn.Linear(1 + n_condition, library_hidden),
                nn.GELU(),
                nn.Dropout(dropout_rate),
                nn.Linear(library_hidden, 1),
            )
            if adaptive_library
            else None
        )
        self.register_buffer("library_log_mean", torch.zeros(1, 1))
        self.register_buffer("library_log_var", torch.ones(1, 1))

    @torch.no_grad()
    def set_library_prior(self, counts: torch.Tensor) -> None:
        """Set the log-library prior: mean and population variance of ``log(total counts)`` of training cells.

        Parameters
        ----------
        counts
            Raw training counts, ``(n_cells, n_genes)``; every cell needs a positive total.
        """
        counts = _check_counts(counts, self.n_genes)
        totals = counts.double().sum(dim=-1)
        if (totals <= 0).any():
            raise ValueError(
                f"{int((totals <= 0).sum())} cells have zero total counts; drop empty cells first "
                "(e.g. scanpy.pp.filter_cells(adata, min_counts=1))."
            )
        log_totals = torch.log(totals)
        variance = log_totals.var(unbiased=False)
        if variance <= 0:
            raise ValueError(
                "the prior needs cells with different total counts (the log-total variance is 0)."
            )
        self.library_log_mean.fill_(log_totals.mean().item())
        self.library_log_var.fill_(variance.item())

    def map_condition(self, condition_states: torch.Tensor) -> torch.Tensor:
        """Map conditioning hidden states to covariates.

        Parameters
        ----------
        condition_states
            ``(n_cells, condition_dim)``, e.g. the language model's hidden state at ``<SIGNAL>``.

        Returns
        -------
        torch.Tensor
            Covariates ``(n_cells, n_condition)`` in the module's dtype.
        """
        _check_matrix("condition_states", condition_states, None, self.condition_dim, "condition_dim")
        return self.condition_mapping(condition_states.to(self.condition_mapping.weight.dtype))

    def inference(
        self,
        counts: torch.Tensor,
        condition: torch.Tensor,
        source_counts: torch.Tensor | None = None,
        has_source: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor | Normal]:
        """Posterior over ``z`` and the log library size.

        Parameters
        ----------
        counts
            Raw counts, ``(n_cells, n_genes)``.
        condition
            Mapped covariates, ``(n_cells, n_condition)`` (output of :meth:`map_condition`).
        source_counts
            Raw counts of the cell each target is a transformed copy of (style transfer: a control cell whose
            perturbed counterpart is the target), ``(n_cells, n_genes)``. Where given, ``z`` is encoded from
            the source and the log library is the source's observed log total.
        has_source
            Which rows of ``source_counts`` are sources, ``(n_cells,)`` bool (default: all).

        Returns
        -------
        dict
            ``VAE_KEYS.qz``: ``Normal`` over ``z``, ``(n_cells, n_latent)``; ``VAE_KEYS.z``: its rsample;
            ``VAE_KEYS.ql``: ``Normal`` over the log library, ``(n_cells, 1)``; ``VAE_KEYS.library``: its
            rsample (the observed log total for rows with a source); ``VAE_KEYS.has_source``: ``(n_cells,)``
            bool. All float32.
        """
        counts = _check_counts(counts, self.n_genes)
        _check_matrix("condition", condition, counts.shape[0], self.n_condition, "n_condition")
        has_source = self._source_mask(source_counts, has_source, counts.shape[0], counts.device)
        read = counts
        if source_counts is not None:
            read = torch.where(has_source[:, None], source_counts.float(), counts)
        encoder_input = torch.log1p(read) if self.log_variational else read
        qz_m, qz_v, z = self.z_encoder(encoder_input, condition)
        ql_m, ql_v, library = self.l_encoder(encoder_input, condition)
        if source_counts is not None:
            library = torch.where(has_source[:, None], _log_library(read), library)
        return {
            VAE_KEYS.qz: Normal(qz_m, qz_v.sqrt()),
            VAE_KEYS.z: z,
            VAE_KEYS.ql: Normal(ql_m, ql_v.sqrt()),
            VAE_KEYS.library: library,
            VAE_KEYS.has_source: has_source,
        }

    def _source_mask(
        self, source_counts: torch.Tensor | None, has_source: torch.Tensor | None, n_cells: int, device
    ) -> torch.Tensor:
        """``(n_cells,)`` bool: the rows encoded from a source cell (none without ``source_counts``)."""
        if source_counts is None:
            if has_source is not None and bool(has_source.any()):
                raise ValueError("has_source marks source cells but no source_counts were given.")
            return torch.zeros(n_cells, dtype=torch.bool, device=device)
        _check_counts(source_counts, self.n_genes)
        if source_counts.shape[0] != n_cells:
            raise ValueError(
                f"source_counts has {source_counts.shape[0]} rows for {n_cells} cells: pass one row per cell."
            )
        if has_source is None:
            return torch.ones(n_cells, dtype=torch.bool, device=device)
        if has_source.shape != (n_cells,):
            raise ValueError(f"has_source must have shape ({n_cells},), got {tuple(has_source.shape)}.")
        return has_source.to(device=device, dtype=torch.bool)

    def generative(
        self, z: torch.Tensor, library_log: torch.Tensor, condition: torch.Tensor
    ) -> dict[str, torch.Tensor | Distribution]:
        """Likelihood of counts given ``z``, the log library size and the covariates.

        Parameters
        ----------
        z
            ``(n_cells, n_latent)``.
        library_log
            Natural-log library size, ``(n_cells, 1)``.
        condition
            Mapped covariates, ``(n_cells, n_condition)``.

        Returns
        -------
        dict
            ``VAE_KEYS.px``: :class:`ZeroInflatedNegativeBinomial` with ``mu``, ``theta``, ``zi_logits`` and
            ``scale`` of shape ``(n_cells, n_genes)``; ``VAE_KEYS.pz``: ``Normal(0, 1)``,
            ``(n_cells, n_latent)``; ``VAE_KEYS.pl``: log-library prior, ``(n_cells, 1)``;
            ``VAE_KEYS.size_factor_log``: the log size factor the decoder used, ``(n_cells, 1)``. All float32.
        """
        _check_matrix("z", z, None, self.n_latent, "n_latent")
        _check_matrix("library_log", library_log, z.shape[0], 1, "1: natural-log total counts")
        _check_matrix("condition", condition, z.shape[0], self.n_condition, "n_condition")
        size_factor_log = self._size_factor_log(library_log, condition)
        px_scale, px_rate, px_dropout = self.decoder(z, condition, size_factor_log)
        n_cells = z.shape[0]
        prior_shape = (n_cells, 1)
        return {
            VAE_KEYS.px: ZeroInflatedNegativeBinomial(
                mu=px_rate, theta=torch.exp(self.px_r.float()), zi_logits=px_dropout, scale=px_scale
            ),
            VAE_KEYS.pz: Normal(
                torch.zeros_like(z, dtype=torch.float32), torch.ones_like(z, dtype=torch.float32)
            ),
            VAE_KEYS.pl: Normal(
                self.library_log_mean.float().expand(prior_shape),
                self.library_log_var.float().sqrt().expand(prior_shape),
            ),
            VAE_KEYS.size_factor_log: size_factor_log,
        }

    def _size_factor_log(self, library_log: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """Log size factor ``(n_cells, 1)``, float32: the library head's output, or ``library_log`` itself."""
        if self.library_head is None:
            return library_log.float()
        dtype = self.library_head[0].weight.dtype
        return self.library_head(torch.cat([library_log.to(dtype), condition.to(dtype)], dim=-1)).float()

    def loss(
        self,
        counts: torch.Tensor,
        inference_outputs: dict[str, torch.Tensor | Distribution],
        generative_outputs: dict[str, torch.Tensor | Distribution],
        kl_weight: float = 1.0,
    ) -> VAELossOutput:
        """Negative ELBO.

        Parameters
        ----------
        counts
            Raw counts, ``(n_cells, n_genes)``.
        inference_outputs
            Output of :meth:`inference`.
        generative_outputs
            Output of :meth:`generative`.
        kl_weight
            Weight of ``KL(q(z) || N(0, I))`` (the library KL is never weighted).

        Returns
        -------
        VAELossOutput
            Scalar loss plus per-cell terms of shape ``(n_cells,)``.
        """
        counts = _check_counts(counts, self.n_genes)
        reconstruction_loss = -generative_outputs[VAE_KEYS.px].log_prob(counts).sum(dim=-1)
        kl_z = kl_divergence(inference_outputs[VAE_KEYS.qz], generative_outputs[VAE_KEYS.pz]).sum(dim=-1)
        kl_library = kl_divergence(inference_outputs[VAE_KEYS.ql], generative_outputs[VAE_KEYS.pl]).sum(
            dim=-1
        )
        has_source = inference_outputs.get(VAE_KEYS.has_source)
        if has_source is not None:  # an observed (source) library has no posterior to regularize
            kl_library = kl_library.masked_fill(has_source, 0.0)
        loss = torch.mean(reconstruction_loss + kl_weight * kl_z + kl_library)
        return VAELossOutput(loss, reconstruction_loss, kl_z, kl_library, kl_weight)

    def forward(
        self,
        counts: torch.Tensor,
        condition_states: torch.Tensor,
        kl_weight: float = 1.0,
        source_counts: torch.Tensor | None = None,
        has_source: torch.Tensor | None = None,
    ) -> VAELossOutput:
        """Map the condition, then run ``inference``, ``generative`` and ``loss``.

        Parameters
        ----------
        counts
            Raw counts, ``(n_cells, n_genes)``.
        condition_states
            ``(n_cells, condition_dim)``.
        kl_weight
            Weight of the latent KL term.
        source_counts, has_source
            Source cells of style transfer (see :meth:`inference`): ``(n_cells, n_genes)`` and ``(n_cells,)``.

        Returns
        -------
        VAELossOutput
            Scalar loss plus per-cell terms of shape ``(n_cells,)``.
        """
        counts = _check_counts(counts, self.n_genes)
        _check_matrix(
            "condition_states", condition_states, counts.shape[0], self.condition_dim, "condition_dim"
        )
        condition = self.map_condition(condition_states)
        inference_outputs = self.inference(counts, condition, source_counts, has_source)
        generative_outputs = self.generative(
            inference_outputs[VAE_KEYS.z], inference_outputs[VAE_KEYS.library], condition
        )
        return self.loss(counts, inference_outputs, generative_outputs, kl_weight=kl_weight)

    @torch.no_grad()
    def sample(
        self,
        condition_states: torch.Tensor,
        num_cells_per_condition: int = 1,
        library_size: torch.Tensor | float | None = None,
        generator: torch.Generator | None = None,
        source_counts: torch.Tensor | None = None,
        has_source: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Generate counts for each condition.

        Random draws, in this order (the original InstructCell order, so a generator seeded like the
        original's global seed reproduces its cells): ``z ~ N(0, I)`` of shape ``(n, n_latent)``; then, only
        when ``library_size`` is None, the log library from the prior, shape ``(n, 1)``; then the ZINB draws
        (Gamma, Poisson, uniform, each ``(n, n_genes)``). Dropout in ``library_head`` follows the module's
        train/eval mode: call ``.eval()`` first (as ``from_pretrained`` does) for deterministic decoding.

        With a source cell (style transfer), the same standard-normal draw ``e`` gives
        ``z = mu + sigma * e`` of the source's posterior ``q(z | source, condition)``, and the library is the
        source's observed total unless ``library_size`` is given.

        Parameters
        ----------
        condition_states
            ``(n_conditions, condition_dim)``.
        num_cells_per_condition
            Cells per condition; rows of the output are grouped by condition (``repeat_interleave`` order).
        library_size
            Total counts (not log): a number, or a tensor with ``n_conditions`` or ``n`` elements. ``None``
            draws the log library from the prior.
        generator
            Optional random generator on the module's device; ``None`` uses torch's global generator.
        source_counts
            Raw counts of the cell each condition transforms, ``(n_conditions, n_genes)``; None: none.
        has_source
            Which conditions have a source, ``(n_conditions,)`` bool (default: all, when sources are given).

        Returns
        -------
        torch.Tensor
            Non-negative integer-valued float32 counts, ``(n, n_genes)`` with
            ``n = n_conditions * num_cells_per_condition``.
        """
        _check_positive_int("num_cells_per_condition", num_cells_per_condition)
        has_source = self._source_mask(
            source_counts, has_source, condition_states.shape[0], condition_states.device
        ).repeat_interleave(num_cells_per_condition)
        condition = self.map_condition(condition_states).repeat_interleave(num_cells_per_condition, dim=0)
        n_cells, device = condition.shape[0], condition.device
        z = torch.randn(n_cells, self.n_latent, generator=generator, device=device)
        source = None
        if source_counts is not None:
            source = source_counts.float().to(device).repeat_interleave(num_cells_per_condition, dim=0)
            q_m, q_v, _ = self.z_encoder(torch.log1p(source) if self.log_variational else source, condition)
            z = torch.where(has_source[:, None], q_m + q_v.sqrt() * z, z)
        if library_size is None:
            noise = torch.randn(n_cells, 1, generator=generator, device=device)
            library_log = noise * self.library_log_var.float().sqrt() + self.library_log_mean.float()
            if source is not None:
                library_log = torch.where(has_source[:, None], _log_library(source), library_log)
        else:
            library_log = self._library_log_from_sizes(
                library_size, condition_states.shape[0], n_cells, device
            )
        px = self.generative(z, library_log, condition)[VAE_KEYS.px]
        return px.sample(generator=generator)

    @staticmethod
    def _library_log_from_sizes(
        library_size: torch.Tensor | float, n_conditions: int, n_cells: int, device: torch.device
    ) -> torch.Tensor:
        """Natural-log library ``(n_cells, 1)`` from totals given once, per condition or per cell."""
        sizes = torch.as_tensor(library_size, dtype=torch.float32, device=device).reshape(-1)
        if sizes.numel() == 1:
            sizes = sizes.expand(n_cells)
        elif sizes.numel() == n_conditions:
            sizes = sizes.repeat_interleave(n_cells // n_conditions)
        elif sizes.numel() != n_cells:
            raise ValueError(
                f"library_size has {sizes.numel()} values; give 1, one per condition ({n_conditions}) "
                f"or one per generated cell ({n_cells})."
            )
        if not (torch.isfinite(sizes) & (sizes > 0)).all():
            raise ValueError("library_size must be positive finite total counts (not log counts).")
        return torch.log(sizes).unsqueeze(-1)
