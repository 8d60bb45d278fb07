"""Build a processor and a model for training: tokenizer, gene vocabulary, preset, backbone, LoRA.

The processor is the model's contract with the data: its gene vocabulary is the built dataset's
``gene_vocab.txt`` and its tokenizer is a pretrained one or one trained offline on the training text. The
model config comes from a preset (``configuration/presets``) with the sizes that must match the processor
filled in from it (:func:`config_for_processor`).
"""

from typing import Any

import datasets
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from datasets_builder.dataset_folder import dataset_genes
from instructcell.configuration import load_preset
from modeling_instructcell import (
    InstructCellConfig,
    InstructCellFeatureExtractor,
    InstructCellForConditionalGeneration,
    InstructCellProcessor,
)

from .arguments import DataArguments, ModelArguments
from .tokenization import train_instruction_tokenizer

# submodules of InstructCellForConditionalGeneration that are new next to the language model
CELL_MODULES = frozenset({"cell_encoder", "language_projection", "cell_vae"})


def config_for_processor(
    preset: str, processor: InstructCellProcessor, **overrides: Any
) -> InstructCellConfig:
    """Build the model config of a preset that matches ``processor``.

    The gene count, special-token ids, placeholder count and the vocabulary size (the tokenizer's
    length rounded up to a multiple of 8) come from the processor, so model and processor agree.

    Parameters
    ----------
    preset : str or PathLike
        Preset name (``tiny``, ``small``, ``base``) or JSON path.
    processor : InstructCellProcessor
        The processor the model will be used with.
    **overrides
        Config fields that replace the preset's.

    Returns
    -------
    InstructCellConfig
    """
    kwargs = {**load_preset(preset), **overrides}
    num_query_tokens = kwargs.pop("num_query_tokens", processor.num_query_tokens)
    if num_query_tokens != processor.num_query_tokens:
        raise ValueError(
            f"The preset uses num_query_tokens={num_query_tokens} but the processor expands cells into "
            f"{processor.num_query_tokens}; build the processor with num_query_tokens={num_query_tokens}."
        )
    vocab_size = -(-len(processor.tokenizer) // 8) * 8
    text_config = {**kwargs.pop("text_config", {}), "vocab_size": vocab_size}
    text_config.setdefault("pad_token_id", processor.tokenizer.pad_token_id)
    text_config.setdefault("eos_token_id", processor.tokenizer.eos_token_id)
    return InstructCellConfig(
        text_config=text_config,
        n_genes=processor.feature_extractor.vocab_size,
        num_query_tokens=processor.num_query_tokens,
        **processor.special_token_ids,
        **kwargs,
    )


def build_processor(model_args: ModelArguments, data_args: DataArguments, train: datasets.Dataset):
    """Processor over the dataset's gene vocabulary with a pretrained or offline-trained tokenizer."""
    genes = dataset_genes(data_args.dataset_dir)
    name = model_args.tokenizer or model_args.backbone
    if name is not None:
        tokenizer = AutoTokenizer.from_pretrained(name)
    else:
        corpus = list(train["instruction"]) + list(train["response"]) + list(train["label"])
        tokenizer = train_instruction_tokenizer(corpus, vocab_size=model_args.tokenizer_vocab_size)
    num_query_tokens = load_preset(model_args.preset).get("num_query_tokens", 8)
    feature_extractor = InstructCellFeatureExtractor(
        gene_names=genes, min_gene_overlap=min_gene_overlap_for(train, len(genes))
    )
    return InstructCellProcessor(feature_extractor, tokenizer, num_query_tokens=num_query_tokens)


def min_gene_overlap_for(train: datasets.Dataset, n_genes: int) -> float:
    """Half the vocabulary coverage of the least-covered training dataset.

    A vocabulary merged from several datasets is covered only in part by each of them (the model saw the
    other genes as zeros), so the featurizer's default 50 % threshold would reject the training data itself.
    """
    coverage = []
    for name in sorted(set(train["dataset"])):
        rows = train.filter(lambda row, n=name: row["dataset"] == n)
        seen = set()
        for column in ("input_gene_indices", "target_gene_indices"):
            for indices in rows[column]:
                seen.update(indices)
        coverage.append(len(seen) / n_genes)
    return round(0.5 * min(coverage), 4)


def build_model(
    model_args: ModelArguments, processor: InstructCellProcessor
) -> InstructCellForConditionalGeneration:
    """Build the preset's model; with ``backbone``, its language model starts from pretrained weights."""
    overrides = {}
    if model_args.backbone is not None:
        backbone = AutoModelForSeq2SeqLM.from_pretrained(model_args.backbone)
        overrides["text_config"] = backbone.config.to_dict()
    overrides["alignment_loss_weight"] = model_args.alignment_loss_weight
    overrides["vae_loss_weight"] = model_args.vae_loss_weight
    overrides["standardize_genes"] = model_args.standardize_genes
    if model_args.vae_kl_weight is not None:
        overrides["vae_kl_weight"] = model_args.vae_kl_weight
    config = config_for_processor(model_args.preset, processor, **overrides)
    model = InstructCellForConditionalGeneration(config)
    if model_args.backbone is not None:
        backbone.resize_token_embeddings(config.text_config.vocab_size)
        model.language_model.load_state_dict(backbone.state_dict())
    if model_args.use_lora:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=model_args.lora_r,
            lora_alpha=model_args.lora_alpha,
            lora_dropout=model_args.lora_dropout,
            target_modules=r".*language_model.*\.(q|v)",
            modules_to_save=sorted(CELL_MODULES),
        )
        model = get_peft_model(model, lora)
    return model
