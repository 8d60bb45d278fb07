"""InstructCell as a Hugging Face model: config, model, featurizer and processor.

Importing this package registers the classes with the ``Auto*`` factories, so that
``AutoModel.from_pretrained(path)`` works without ``trust_remote_code`` for local use.
The same files are pushed to the Hub as remote code
(see ``InstructCellForConditionalGeneration.register_for_auto_class``).
"""

from transformers import AutoConfig, AutoFeatureExtractor, AutoModel, AutoModelForSeq2SeqLM, AutoProcessor

from .configuration_instructcell import InstructCellConfig
from .feature_extraction_instructcell import GeneAlignment, InstructCellFeatureExtractor
from .modeling_instructcell import (
    InstructCellForConditionalGeneration,
    InstructCellForConditionalGenerationModelOutput,
    InstructCellGenerateCellsOutput,
    InstructCellLabelScoresOutput,
    InstructCellPreTrainedModel,
)
from .pipeline_instructcell import TASK as PIPELINE_TASK
from .pipeline_instructcell import InstructCellPipeline, _register
from .processing_instructcell import InstructCellProcessor

AutoConfig.register(InstructCellConfig.model_type, InstructCellConfig, exist_ok=True)
AutoModel.register(InstructCellConfig, InstructCellForConditionalGeneration, exist_ok=True)
AutoModelForSeq2SeqLM.register(InstructCellConfig, InstructCellForConditionalGeneration, exist_ok=True)
AutoFeatureExtractor.register(InstructCellConfig, InstructCellFeatureExtractor, exist_ok=True)
AutoProcessor.register(InstructCellConfig, InstructCellProcessor, exist_ok=True)
_register()  # pipeline("single-cell-instruction", model=...) for local use

__all__ = [
    "GeneAlignment",
    "InstructCellConfig",
    "InstructCellFeatureExtractor",
    "InstructCellForConditionalGeneration",
    "InstructCellForConditionalGenerationModelOutput",
    "InstructCellGenerateCellsOutput",
    "InstructCellLabelScoresOutput",
    "InstructCellPreTrainedModel",
    "InstructCellPipeline",
    "InstructCellProcessor",
    "PIPELINE_TASK",
]
