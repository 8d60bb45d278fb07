import math

import pytest
import torch
from torch.distributions import NegativeBinomial

from modeling_instructcell.modeling_cell_vae import (
    VAE_KEYS,
    InstructCellConditionalVAE,
    VAELossOutput,
    ZeroInflatedNegativeBinomial,
    log_nb_positive,
    log_zinb_positive,
)

N_GENES = 24
CONDITION_DIM = 12


def make_vae(**overrides) -> InstructCellConditionalVAE:
    kwargs = dict(
        n_genes=N_GENES,
        condition_dim=CONDITION_DIM,
        n_latent=4,
        n_hidden=16,
        n_layers=2,
        n_condition=6,
        library_hidden=8,
    )
    kwargs.update(overrides)
    torch.manual_seed(0)
    return InstructCellConditionalVAE(**kwargs)


def make_counts(n_cells: int = 8, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    rates = torch.rand(n_cells, N_GENES, generator=generator) ** 3 * 12
    return torch.poisson(rates, generator=generator)


def zinb_params(shape=(3, 5), seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    mu = torch.rand(shape, generator=generator) * 10 + 0.1
    theta = torch.rand(shape[-1:], generator=generator) * 5 + 0.2
    zi_logits = torch.randn(shape, generator=generator)
    return mu, theta, zi_logits


# ------------------------------------------------------------------------------------------------------------
# Likelihood and distribution
# ------------------------------------------------------------------------------------------------------------
def test_function_and_distribution_log_prob_agree():
    mu, theta, zi_logits = zinb_params()
    x = torch.randint(0, 8, mu.shape).float()
    dist = ZeroInflatedNegativeBinomial(mu, theta, zi_logits)
    torch.testing.assert_close(dist.log_prob(x), log_zinb_positive(x, mu, theta, zi_logits))
    assert dist.batch_shape == mu.shape
    assert dist.theta.shape == mu.shape


def test_zinb_without_inflation_equals_nb():
    mu, theta, _ = zinb_params()
    x = torch.randint(0, 8, mu.shape).float()
    no_inflation = torch.full_like(mu, -math.inf)
    torch.testing.assert_close(log_zinb_positive(x, mu, theta, no_inflation), log_nb_positive(x, mu, theta))


def test_nb_matches_torch_negative_binomial():
    mu = torch.tensor([0.5, 3.0, 40.0])
    theta = torch.tensor([0.7, 2.0, 10.0])
    x = torch.tensor([0.0, 4.0, 31.0])
    expected = NegativeBinomial(total_count=theta, probs=mu / (mu + theta)).log_prob(x)
    torch.testing.assert_close(log_nb_positive(x, mu, theta), expected, atol=1e-5, rtol=1e-5)


def test_zinb_zero_and_nonzero_probability_by_hand():
    mu, theta, zi_logits = torch.tensor([2.0, 2.0]), torch.tensor([1.5, 1.5]), torch.tensor([0.3, 0.3])
    pi = torch.sigmoid(zi_logits)
    nb = NegativeBinomial(total_count=theta, probs=mu / (mu + theta))
    x = torch.tensor([0.0, 3.0])
    expected = torch.stack(
        [torch.log(pi[0] + (1 - pi[0]) * nb.log_prob(x)[0].exp()), torch.log(1 - pi[1]) + nb.log_prob(x)[1]]
    )
    torch.testing.assert_close(log_zinb_positive(x, mu, theta, zi_logits), expected)


def test_sample_shapes_and_support():
    mu, theta, zi_logits = zinb_params(shape=(3, 4))
    dist = ZeroInflatedNegativeBinomial(mu, theta, zi_logits)
    assert dist.sample().shape == (3, 4)
    samples = dist.sample((5,))
    assert samples.shape == (5, 3, 4)
    assert (samples >= 0).all() and torch.equal(samples, samples.round())


def test_sample_moments_match_mean_and_variance():
    mu, theta, zi_logits = (
        torch.tensor([0.5, 5.0, 30.0]),
        torch.tensor([0.8, 2.0, 5.0]),
        torch.tensor([-1.0, 0.0, 1.0]),
    )
    dist = ZeroInflatedNegativeBinomial(mu, theta, zi_logits)
    samples = dist.sample((200_000,), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(samples.mean(0), dist.mean, rtol=0.03, atol=0.01)
    torch.testing.assert_close(samples.var(0), dist.variance, rtol=0.06, atol=0.02)


def test_sample_draw_order_is_gamma_poisson_uniform():
    mu, theta, zi_logits = zinb_params(shape=(2, 6))
    sample = ZeroInflatedNegativeBinomial(mu, theta, zi_logits).sample(
        generator=torch.Generator().manual_seed(3)
    )
    generator = torch.Generator().manual_seed(3)
    gamma = torch._standard_gamma(theta.expand(2, 6), generator=generator) / (theta / mu)
    poisson = torch.poisson(gamma, generator=generator)
    uniform = torch.rand(2, 6, generator=generator)
    torch.testing.assert_close(sample, torch.where(uniform <= torch.sigmoid(zi_logits), 0.0, poisson))


@pytest.mark.parametrize(
    "mu, theta, zi_logits",
    [
        (torch.tensor([-1.0, 2.0]), torch.tensor([1.0, 1.0]), torch.zeros(2)),
        (torch.tensor([1.0, 2.0]), torch.tensor([0.0, 1.0]), torch.zeros(2)),
        (torch.tensor([1.0, 2.0]), torch.tensor([1.0, 1.0]), torch.tensor([float("nan"), 0.0])),
        (torch.ones(2, 3), torch.ones(4), torch.zeros(2, 3)),
    ],
)
def test_invalid_parameters_raise(mu, theta, zi_logits):
    with pytest.raises(ValueError):
        ZeroInflatedNegativeBinomial(mu, theta, zi_logits, validate_args=True)


@pytest.mark.parametrize("value", [torch.tensor([-1.0, 0.0]), torch.tensor([1.5, 0.0])])
def test_log_prob_outside_support_raises(value):
    dist = ZeroInflatedNegativeBinomial(torch.ones(2), torch.ones(2), torch.zeros(2), validate_args=True)
    with pytest.raises(ValueError):
        dist.log_prob(value)


# ------------------------------------------------------------------------------------------------------------
# Conditional VAE
# ------------------------------------------------------------------------------------------------------------
def test_state_dict_keys_are_clean():
    keys = set(make_vae().state_dict())
    for key in [
        "condition_mapping.weight",
        "z_encoder.layers.0.linear.weight",
        "z_encoder.layers.1.linear.bias",
        "z_encoder.mean_encoder.weight",
        "z_encoder.var_encoder.bias",
        "l_encoder.layers.0.linear.weight",
        "decoder.layers.1.linear.weight",
        "decoder.scale_head.weight",
        "decoder.dropout_head.bias",
        "library_head.0.weight",
        "library_head.3.bias",
        "px_r",
        "library_log_mean",
        "library_log_var",
    ]:
        assert key in keys
    assert "l_encoder.layers.1.linear.weight" not in keys
    assert not any(key.startswith("library_head") for key in make_vae(adaptive_library=False).state_dict())


def test_inference_and_generative_shapes():
    vae = make_vae().eval()
    counts = make_counts(5)
    condition = vae.map_condition(torch.randn(5, CONDITION_DIM))
    inference = vae.inference(counts, condition)
    assert inference[VAE_KEYS.z].shape == (5, 4) and inference[VAE_KEYS.library].shape == (5, 1)
    generative = vae.generative(inference[VAE_KEYS.z], inference[VAE_KEYS.library], condition)
    px = generative[VAE_KEYS.px]
    assert isinstance(px, ZeroInflatedNegativeBinomial)
    assert px.mu.shape == px.theta.shape == px.zi_logits.shape == (5, N_GENES)
    torch.testing.assert_close(px.mu.sum(-1, keepdim=True), generative[VAE_KEYS.size_factor_log].exp())
    torch.testing.assert_close(px.scale.sum(-1), torch.ones(5))


def test_loss_is_finite_and_gradients_reach_every_parameter():
    vae = make_vae()
    output = vae(make_counts(6), torch.randn(6, CONDITION_DIM), kl_weight=3.0)
    assert isinstance(output, VAELossOutput)
    assert output.loss.dim() == 0 and torch.isfinite(output.loss)
    assert output.reconstruction_loss.shape == output.kl_z.shape == output.kl_library.shape == (6,)
    expected = (output.reconstruction_loss + 3.0 * output.kl_z + output.kl_library).mean()
    torch.testing.assert_close(output.loss, expected)
    assert set(output.means()) == {"loss", "reconstruction_loss", "kl_z", "kl_library"}
    output.loss.backward()
    for name, parameter in vae.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_overfitting_a_few_cells_lowers_the_loss():
    vae = make_vae(dropout_rate=0.0)
    counts, states = make_counts(8), torch.randn(8, CONDITION_DIM)
    vae.set_library_prior(counts)
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-2)
    losses = []
    for _ in range(100):
        optimizer.zero_grad()
        loss = vae(counts, states).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10


def test_sample_gives_reproducible_nonnegative_integers():
    vae = make_vae().eval()
    states = torch.randn(3, CONDITION_DIM)
    first = vae.sample(states, num_cells_per_condition=2, generator=torch.Generator().manual_seed(5))
    second = vae.sample(states, num_cells_per_condition=2, generator=torch.Generator().manual_seed(5))
    assert first.shape == (6, N_GENES)
    assert (first >= 0).all() and torch.equal(first, first.round())
    assert torch.equal(first, second)


def test_sample_draw_order_is_z_library_then_zinb():
    vae = make_vae().eval()
    states = torch.randn(2, CONDITION_DIM)
    sample = vae.sample(states, generator=torch.Generator().manual_seed(11))
    generator = torch.Generator().manual_seed(11)
    z = torch.randn(2, 4, generator=generator)
    library_log = torch.randn(2, 1, generator=generator) * vae.library_log_var.sqrt() + vae.library_log_mean
    px = vae.generative(z, library_log, vae.map_condition(states))[VAE_KEYS.px]
    torch.testing.assert_close(sample, px.sample(generator=generator))


def test_library_size_controls_totals_without_adaptive_library():
    vae = make_vae(adaptive_library=False).eval()
    states = torch.randn(2, CONDITION_DIM)
    generator = torch.Generator().manual_seed(0)
    small = vae.sample(states, num_cells_per_condition=200, library_size=200.0, generator=generator)
    large = vae.sample(
        states, num_cells_per_condition=200, library_size=torch.tensor([2e4, 2e4]), generator=generator
    )
    ratio = large.sum(-1).mean() / small.sum(-1).mean()
    assert 70 < ratio < 140
    z, library_log = torch.zeros(1, 4), torch.log(torch.tensor([[5000.0]]))
    px = vae.generative(z, library_log, vae.map_condition(states[:1]))[VAE_KEYS.px]
    torch.testing.assert_close(px.mu.sum(), torch.tensor(5000.0))


def test_set_library_prior_computes_log_total_moments():
    vae = make_vae()
    counts = make_counts(10) + 1
    vae.set_library_prior(counts)
    log_totals = torch.log(counts.sum(-1).double())
    torch.testing.assert_close(vae.library_log_mean, log_totals.mean().float().reshape(1, 1))
    torch.testing.assert_close(vae.library_log_var, log_totals.var(unbiased=False).float().reshape(1, 1))
    assert vae.library_log_mean.shape == vae.library_log_var.shape == (1, 1)


def test_bfloat16_module_keeps_likelihood_in_float32():
    vae = make_vae().to(torch.bfloat16)
    output = vae(make_counts(4), torch.randn(4, CONDITION_DIM))
    assert output.loss.dtype == torch.float32 and torch.isfinite(output.loss)
    sample = vae.eval().sample(torch.randn(2, CONDITION_DIM), generator=torch.Generator().manual_seed(0))
    assert sample.dtype == torch.float32 and sample.shape == (2, N_GENES)


@pytest.mark.parametrize(
    "counts, states, message",
    [
        (-make_counts(3) - 1, torch.randn(3, CONDITION_DIM), "negative"),
        (make_counts(3) + 0.5, torch.randn(3, CONDITION_DIM), "non-integer"),
        (make_counts(3)[:, :-1], torch.randn(3, CONDITION_DIM), "columns"),
        (make_counts(3), torch.randn(3, CONDITION_DIM + 1), "columns"),
        (make_counts(3), torch.randn(2, CONDITION_DIM), "rows"),
        (make_counts(3)[0], torch.randn(1, CONDITION_DIM), "2-D"),
    ],
)
def test_bad_vae_inputs_raise(counts, states, message):
    with pytest.raises(ValueError, match=message):
        make_vae()(counts, states)


def test_bad_sampling_and_prior_inputs_raise():
    vae = make_vae()
    states = torch.randn(2, CONDITION_DIM)
    with pytest.raises(ValueError, match="positive finite"):
        vae.sample(states, library_size=torch.tensor([100.0, 0.0]))
    with pytest.raises(ValueError, match="one per condition"):
        vae.sample(states, library_size=torch.tensor([100.0, 200.0, 300.0]))
    with pytest.raises(ValueError, match="num_cells_per_condition"):
        vae.sample(states, num_cells_per_condition=0)
    with pytest.raises(ValueError, match="zero total counts"):
        vae.set_library_prior(torch.zeros(3, N_GENES))
    with pytest.raises(ValueError, match="n_latent"):
        InstructCellConditionalVAE(n_genes=10, condition_dim=4, n_latent=0)
