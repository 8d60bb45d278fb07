"""Perturbation response prediction (PRP): a control cell as it would look after a stimulus or a drug.

The instruction holds one unperturbed cell (``{input}``) and the perturbation in words (``{perturbation}``,
e.g. "interferon beta"); the answer is ``<SIGNAL>``, whose hidden state conditions the cell VAE that returns
the perturbed cell's integer counts. Training rows pair each perturbed cell with a control cell of the same
cell type (``datasets_builder.perturbation_pairs``); the label is the cell type, so evaluation and baselines
group cells by it.
"""

from .base import Task, TaskGrammar

#: The perturbation text of the rows that map a control cell onto itself: they show the model every
#: control cell (also those of cell types never seen perturbed) and what "unchanged" means.
CONTROL_PERTURBATION = "no perturbation"

PERTURBATION_RESPONSE = Task(
    name="prp",
    title="perturbation response prediction",
    input_cell=True,
    output_cell=True,
    label_key="cell_type",
    label_placeholder=None,
    required_placeholders=frozenset(["input", "perturbation"]),
    optional_placeholders=frozenset(["sequencing_method", "species", "tissue"]),
    response_placeholders=frozenset(["perturbation", "sequencing_method", "species", "tissue"]),
    metadata_keys=("species", "tissue", "sequencing_method"),
    metric_family="perturbation",
    baselines=("no_change", "additive"),
    drop_rare_labels=False,
    default_instruction="How would this cell respond to {perturbation}? {input}",
    default_labels=None,
    grammar=TaskGrammar(
        description="perturbation response prediction: another person predicts the expression profile of "
        "the single cell {input} after it is exposed to {perturbation}",
        cores={
            "high": [
                "Predict the transcriptional response of this cell to {perturbation}.",
                "Simulate this cell's expression profile after exposure to {perturbation}.",
                "What would this unperturbed cell look like after {perturbation}?",
                "Generate the counterfactual profile of {input} under {perturbation}.",
                "Model the gene expression changes that {perturbation} would induce in this cell.",
                "Infer the post-treatment transcriptome of this cell given {perturbation}.",
                "Project this control cell into the {perturbation} condition.",
                "Output the expression vector this cell would have following {perturbation}.",
                "Forecast how {perturbation} shifts the expression state of this cell.",
                "Produce the perturbed counterpart of this control profile for {perturbation}.",
                "Estimate the single-cell response to {perturbation} starting from {input}.",
                "Translate this baseline transcriptome into its {perturbation}-treated state.",
            ],
            "low": [
                "How would this cell respond to {perturbation}?",
                "What happens to this cell if I give it {perturbation}?",
                "Can you show me this cell after {perturbation}?",
                "Show me how {perturbation} would change this cell.",
                "If this cell got {perturbation}, what would it look like?",
                "Make a version of this cell that was treated with {perturbation}.",
                "What would {perturbation} do to this cell: {input}?",
                "Could you predict this cell after it meets {perturbation}?",
                "I'd like to see this cell once {perturbation} has acted on it.",
                "Turn this untreated cell into one that saw {perturbation}, please.",
            ],
        },
        answers=[
            "Here is the cell after {perturbation}: {output}",
            "Predicted response to {perturbation}: {output}",
            "This is how I expect the cell to look under {perturbation}: {output}",
            "Simulated perturbed profile: {output}",
            "Here is the predicted cell: {output}",
            "After {perturbation}, the cell would look like this: {output}",
            "Counterfactual profile: {output}",
            "Here it is: {output}",
            "The treated version of your cell: {output}",
            "My prediction for {perturbation}, one cell: {output}",
        ],
        notes={"high": [""], "low": [""]},
        motivations=(
            "planning a stimulation experiment",
            "screening drugs in silico",
            "studying interferon signalling",
            "choosing doses for a follow-up assay",
            "predicting side effects on immune cells",
            "comparing responders and non-responders",
            "designing a CRISPR screen",
            "understanding cell-type-specific responses",
            "prioritising compounds for a lab test",
            "estimating the effect on a rare cell type",
            "validating a perturbation model",
            "writing a grant proposal",
            "teaching how cells react to stimuli",
            "interpreting a clinical trial sample",
            "checking a hypothesis before an experiment",
        ),
    ),
)
