"""Build a processor and a model for training: tokenizer, gene vocabulary, preset, backbone, LoRA.

The processor is the model's contract with the data: its gene vocabulary is the built dataset's
``gene_vocab.txt`` and its tokenizer is a pretrained one or one trained offline on the training text. The
model config comes from a preset (``configuration/presets``) with the sizes that must match the processor
filled in from it (:func:`config_for_processor`).

With ``init_from`` (fine-tuning a saved model folder) both come from the folder instead: its processor (gene
vocabulary, tokenizer) and its weights (cell encoder, language model, cell decoder). The data must have been
built with that vocabulary (``instructcell build-data --gene-vocab-from``); labels are text, so a new cell
type is a new answer the same tokenizer writes. The run's loss weights (``alignment_loss_weight``,
``vae_loss_weight``, ``vae_kl_weight``) apply to the loaded model.
"""

import logging
from typing import Any

import datasets
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from datasets_builder.dataset_folder import dataset_genes
from instructcell.configuration import load_preset
from instructcell.hub import load_processor
from modeling_instructcell import (
    InstructCellConfig,
    InstructCellFeatureExtractor,
    InstructCellForConditionalGeneration,
    InstructCellProcessor,
)

from .arguments import DataArguments, ModelArguments
from .tokenization import train_instruction_tokenizer

logger = logging.getLogger(__name__)

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


def number_token_ids(processor: InstructCellProcessor, n: int) -> list[list[int]]:
    """Token ids of the numbers 1..n as prompts write them after a word (``cell 3``): the cell slots."""
    tokenizer = processor.tokenizer
    return [tokenizer(f" {i}", add_special_tokens=False)["input_ids"] for i in range(1, n + 1)]


def build_processor(
    model_args: ModelArguments, data_args: DataArguments, train: datasets.Dataset
) -> InstructCellProcessor:
    """Processor over the dataset's gene vocabulary with a pretrained or offline-trained tokenizer.

    With ``init_from``, the saved model's processor, once the data is checked against it
    (:func:`saved_processor`).
    """
    if model_args.init_from is not None:
        return saved_processor(model_args, data_args, train)
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


def saved_processor(
    model_args: ModelArguments, data_args: DataArguments, train: datasets.Dataset
) -> InstructCellProcessor:
    """Load the processor of the ``init_from`` folder, after checking that the data and the flags fit it.

    Raises
    ------
    ValueError
        A tokenizer or backbone flag (the saved tokenizer is kept), a dataset built with another gene
        vocabulary, or training text with characters the saved tokenizer cannot write.
    """
    given = [flag for flag in ("backbone", "tokenizer") if getattr(model_args, flag) is not None]
    if given:
        raise ValueError(
            "--init_from keeps the saved model's language model and tokenizer: drop "
            f"--{' and --'.join(given)}."
        )
    processor = load_processor(model_args.init_from)
    genes = dataset_genes(data_args.dataset_dir)
    if genes != list(processor.feature_extractor.gene_names):
        raise ValueError(
            f"{data_args.dataset_dir} was built with its own gene vocabulary ({len(genes)} genes), not the "
            f"{processor.feature_extractor.vocab_size} genes of {model_args.init_from}: rebuild it with "
            f"`instructcell build-data OUT ... --gene-vocab-from {model_args.init_from}`."
        )
    texts = sorted(set(train["label"]) | set(train["response"]) | set(train["instruction"]))
    unknown = processor.tokenizer.unk_token_id
    unwritable = [
        t for t, ids in zip(texts, processor.tokenizer(texts)["input_ids"], strict=True) if unknown in ids
    ]
    if unwritable:
        raise ValueError(
            f"{len(unwritable)} training texts have characters the tokenizer of {model_args.init_from} "
            f"cannot write, e.g. {unwritable[:3]}: spell the labels and metadata with characters the model "
            "knows (e.g. ASCII: 'gamma-delta T cell')."
        )
    return processor


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


def saved_model(model_args: ModelArguments) -> InstructCellForConditionalGeneration:
    """Load the model of the ``init_from`` folder and give it the run's loss weights.

    Raises
    ------
    ValueError
        No weights in the folder, or ``standardize_genes`` asked of a model built without gene statistics.
    """
    folder = model_args.init_from
    try:
        model = InstructCellForConditionalGeneration.from_pretrained(folder)
    except OSError as err:
        raise ValueError(
            f"No model weights load from {folder} ({err}): pass a folder written by `instructcell train` "
            "(<output_dir>/final)."
        ) from err
    if model_args.standardize_genes and not model.config.standardize_genes:
        raise ValueError(
            f"{folder} was trained without per-gene standardization: fine-tune it with "
            "--standardize_genes false."
        )
    model.config.alignment_loss_weight = model_args.alignment_loss_weight
    model.config.vae_loss_weight = model_args.vae_loss_weight
    if model_args.vae_kl_weight is not None:
        model.config.vae_kl_weight = model_args.vae_kl_weight
    logger.info("Fine-tuning %s (its architecture; the preset %r does not apply)", folder, model_args.preset)
    return model


def build_model(
    model_args: ModelArguments, processor: InstructCellProcessor
) -> InstructCellForConditionalGeneration:
    """Build the preset's model; with ``backbone``, its language model starts from pretrained weights.

    With ``init_from``, the saved model (:func:`saved_model`). ``use_lora`` then wraps either in LoRA.
    """
    if model_args.init_from is not None:
        return _with_lora(saved_model(model_args), model_args)
    overrides = {}
    if model_args.backbone is not None:
        backbone = AutoModelForSeq2SeqLM.from_pretrained(model_args.backbone)
        overrides["text_config"] = backbone.config.to_dict()
    overrides["alignment_loss_weight"] = model_args.alignment_loss_weight
    overrides["vae_loss_weight"] = model_args.vae_loss_weight
    overrides["standardize_genes"] = model_args.standardize_genes
    if model_args.cell_slots:
        overrides["cell_slot_token_ids"] = number_token_ids(processor, model_args.cell_slots)
    if model_args.vae_kl_weight is not None:
        overrides["vae_kl_weight"] = model_args.vae_kl_weight
    config = config_for_processor(model_args.preset, processor, **overrides)
    model = InstructCellForConditionalGeneration(config)
    if model_args.backbone is not None:
        backbone.resize_token_embeddings(config.text_config.vocab_size)
        model.language_model.load_state_dict(backbone.state_dict())
    return _with_lora(model, model_args)


def _with_lora(model: InstructCellForConditionalGeneration, model_args: ModelArguments):
    """LoRA on the language model's q/v projections (cell modules trained in full) when ``use_lora``."""
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
