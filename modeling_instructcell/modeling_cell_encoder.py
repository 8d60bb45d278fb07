"""Cell encoder: raw counts -> residual MLP key/value tokens -> Q-Former query embeddings."""

import torch
from torch import nn
from transformers import Blip2QFormerModel

from .configuration_instructcell import InstructCellConfig


def normalize_counts(counts: torch.Tensor, target_sum: float | None, log1p: bool) -> torch.Tensor:
    """Scale every cell to ``target_sum`` total counts, then ``log1p`` (scanpy's normalize_total + log1p).

    Parameters
    ----------
    counts : torch.Tensor
        Raw counts, shape ``(n_cells, n_genes)``.
    target_sum : float or None
        Total every cell is scaled to; ``None`` skips the scaling.
    log1p : bool
        Whether to apply ``log(1 + x)`` afterwards.

    Returns
    -------
    torch.Tensor
        Shape ``(n_cells, n_genes)``, float.
    """
    values = counts.float()
    if target_sum is not None:
        totals = values.sum(dim=-1, keepdim=True)
        values = values / totals.clamp_min(torch.finfo(values.dtype).tiny) * target_sum
    if log1p:
        values = torch.log1p(values)
    return values


class InstructCellResidualBlock(nn.Module):
    """``Linear -> GELU -> Dropout`` with an optional residual connection."""

    def __init__(self, in_features: int, out_features: int, dropout: float, residual: bool):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.activation = nn.GELU()
        self.dropout = nn.Dropout(dropout)
        self.residual = residual

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Map ``(n, in_features)`` to ``(n, out_features)``."""
        output = self.dropout(self.activation(self.linear(hidden_states)))
        return output + hidden_states if self.residual else output


class InstructCellCellEncoder(nn.Module):
    """Turns one cell's count vector into ``num_query_tokens`` embeddings (the paper's cell encoder).

    Counts are normalized and log-transformed here, behind ``config.target_sum`` / ``config.log1p``, so
    callers always pass raw counts. A residual MLP turns the gene vector into ``num_kv_tokens`` tokens
    of width ``qformer_config.encoder_hidden_size``. Learned ``query_tokens`` cross-attend to them in a
    BLIP-2 Q-Former (transformers' ``Blip2QFormerModel``), which returns one embedding per query.
    """

    def __init__(self, config: InstructCellConfig):
        super().__init__()
        self.config = config
        kv_width = config.num_kv_tokens * config.qformer_config.encoder_hidden_size
        blocks = [
            InstructCellResidualBlock(config.n_genes, kv_width, config.cell_mlp_dropout, residual=False)
        ]
        for index in range(1, config.cell_mlp_num_blocks):
            is_last = index == config.cell_mlp_num_blocks - 1
            dropout = 0.0 if is_last else config.cell_mlp_dropout
            blocks.append(InstructCellResidualBlock(kv_width, kv_width, dropout, residual=True))
        self.mlp = nn.Sequential(*blocks)
        self.query_tokens = nn.Parameter(
            torch.zeros(1, config.num_query_tokens, config.qformer_config.hidden_size)
        )
        self.qformer = Blip2QFormerModel._from_config(config.qformer_config)
        if config.standardize_genes:
            self.register_buffer("gene_mean", torch.zeros(config.n_genes))
            self.register_buffer("gene_std", torch.ones(config.n_genes))

    @torch.no_grad()
    def set_gene_statistics(self, cell_values: torch.Tensor) -> None:
        """Per-gene mean and standard deviation of the normalized training cells (``standardize_genes``).

        Parameters
        ----------
        cell_values : torch.Tensor
            Raw training counts, shape ``(n_cells, n_genes)``; genes that never vary get a scale of 1.
        """
        if not self.config.standardize_genes:
            raise ValueError("This model was built with standardize_genes=False: it has no gene statistics.")
        if cell_values.dim() != 2 or cell_values.shape[-1] != self.config.n_genes or cell_values.shape[0] < 2:
            raise ValueError(
                f"Need raw counts of at least 2 cells, shape (n_cells, {self.config.n_genes}); "
                f"got {tuple(cell_values.shape)}."
            )
        values = normalize_counts(cell_values, self.config.target_sum, self.config.log1p).double()
        std = values.std(dim=0, unbiased=False)
        self.gene_mean.copy_(values.mean(dim=0))
        self.gene_std.copy_(torch.where(std > 0, std, torch.ones_like(std)))

    def get_kv_tokens(self, cell_values: torch.Tensor) -> torch.Tensor:
        """Residual-MLP key/value tokens.

        Parameters
        ----------
        cell_values : torch.Tensor
            Raw counts, shape ``(n_cells, n_genes)``.

        Returns
        -------
        torch.Tensor
            Shape ``(n_cells, num_kv_tokens, encoder_hidden_size)``.
        """
        if cell_values.dim() != 2 or cell_values.shape[-1] != self.config.n_genes:
            raise ValueError(
                f"cell_values must have shape (n_cells, {self.config.n_genes}), "
                f"got {tuple(cell_values.shape)}. "
                "Align genes to the model's vocabulary with the processor's feature extractor."
            )
        first_linear = self.mlp[0].linear
        values = normalize_counts(cell_values, self.config.target_sum, self.config.log1p)
        if self.config.standardize_genes:
            values = ((values - self.gene_mean) / self.gene_std).clamp(-10.0, 10.0)
        hidden = self.mlp(values.to(first_linear.weight.dtype))
        return hidden.view(cell_values.shape[0], self.config.num_kv_tokens, -1)

    def forward(self, cell_values: torch.Tensor) -> torch.Tensor:
        """Encode cells into query embeddings.

        Parameters
        ----------
        cell_values : torch.Tensor
            Raw counts, shape ``(n_cells, n_genes)``.

        Returns
        -------
        torch.Tensor
            Q-Former outputs, shape ``(n_cells, num_query_tokens, qformer hidden_size)``.
        """
        kv_tokens = self.get_kv_tokens(cell_values)
        query_tokens = self.query_tokens.expand(kv_tokens.shape[0], -1, -1)
        qformer_outputs = self.qformer(
            query_embeds=query_tokens,
            encoder_hidden_states=kv_tokens,
            encoder_attention_mask=torch.ones(
                kv_tokens.shape[:-1], dtype=torch.long, device=kv_tokens.device
            ),
            return_dict=True,
        )
        return qformer_outputs.last_hidden_state
