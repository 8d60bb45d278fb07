"""Answer extraction: rules on hand-picked cases, and the paper-style measurement (templates x labels)."""

import json
import sys
from pathlib import Path

import pytest
from script_modules import load_script

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from modeling_instructcell.answer_extraction import AnswerExtractor, extract_label  # noqa: E402

# Label sets copied here so the tests need no ../shared:
# the original choices.json and the labels of the shared datasets.
LABEL_SETS = {
    "Bastidas-Ponce-2019": [
        "Acinar",
        "Alpha",
        "Beta",
        "Delta",
        "Ductal",
        "Epsilon",
        "Fev+",
        "Multipotent",
        "Ngn3 high EP",
        "Ngn3 low EP",
        "Tip",
        "Trunk",
    ],
    "He-2020-Liver": [
        "B Cell",
        "Cholangiocyte",
        "Endothelial Cell",
        "Macrophage",
        "Monocyte",
        "NK/T Cell",
        "Smooth Muscle Cell",
        "T Cell",
    ],
    "Ma-2020": [
        "Basal",
        "Dermal Fibroblast",
        "Dermal Papilla",
        "Dermal Sheath",
        "Endothelial",
        "Granular",
        "Hair Shaft-cuticle.cortex",
        "IRS",
        "Infundibulum",
        "Isthmus",
        "K6+ Bulge Companion Layer",
        "Macrophage DC",
        "Medulla",
        "Melanocyte",
        "Mix",
        "ORS",
        "Schwann Cell",
        "Sebaceous Gland",
        "Spinous",
        "TAC-1",
        "TAC-2",
        "ahighCD34+ bulge",
        "alowCD34+ bulge",
    ],
    "Segerstolpe-2016": ["Acinar", "Alpha", "Beta", "Delta", "Ductal", "Gamma", "PSC"],
    "Xin-2016": ["Acinar", "Alpha", "Beta", "Delta", "Ductal", "Endothelial", "Mesenchyme", "PP"],
    "GSE110894": ["Resistant", "Sensitive"],
    "GSE117872": ["Holiday", "Resistant", "Sensitive"],
    "GSE149383": ["Resistant", "Sensitive"],
    "bastidas_ponce_2019_pancreas": [
        "Ductal",
        "Ngn3 low EP",
        "Ngn3 high EP",
        "Pre-endocrine",
        "Beta",
        "Alpha",
        "Delta",
        "Epsilon",
    ],
    "kang2018_pbmc_ifnb_muscat": [
        "CD14+ Monocytes",
        "CD4 T cells",
        "B cells",
        "FCGR3A+ Monocytes",
        "CD8 T cells",
    ],
    "zheng2017_sorted_pbmc": [
        "CD14+ monocyte",
        "CD19+ B cell",
        "CD4+ helper T cell",
        "CD4+/CD25+ regulatory T cell",
        "CD4+/CD45RA+/CD25- naive T cell",
        "CD4+/CD45RO+ memory T cell",
        "CD56+ NK cell",
        "CD8+ cytotoxic T cell",
        "CD8+/CD45RA+ naive cytotoxic T cell",
    ],
    "pbmc68k_reduced_counts": [
        "CD14+ Monocyte",
        "CD19+ B",
        "CD34+",
        "CD4+/CD25 T Reg",
        "CD4+/CD45RA+/CD25- Naive T",
        "CD4+/CD45RO+ Memory",
        "CD56+ NK",
        "CD8+ Cytotoxic T",
        "CD8+/CD45RA+ Naive Cytotoxic",
        "Dendritic",
    ],
    "baron2016_pancreas_human_mini_cider": ["activated_stellate", "alpha", "beta", "delta", "macrophage"],
    "pc9_erlotinib_day11_dsp": ["resistant", "sensitive"],
}

# Chat-style response templates written for this test (the project's template bank lives elsewhere).
RESPONSE_TEMPLATES = [
    "{output}",
    "{output}.",
    "The cell type is {output}.",
    "Based on the expression profile, this cell is most likely a {output}.",
    "After looking at the {tissue} sample from {species} sequenced with {sequencing_method}, "
    "I would annotate this single cell as {output}.",
    "Answer: {output}",
    "This cell can be classified as **{output}** given its marker genes.",
    'I\'m fairly confident the label you are looking for is "{output}". '
    "Let me know if you need more details!",
    "Sure! The single cell you provided is identified as {output}, which is consistent with the highly "
    "expressed genes in its profile.",
    "Considering the options and the data from {tissue}, the most probable annotation is {output}; "
    "this agrees with the known expression signature of that population.",
    "{output} is the most likely identity of this cell.",
    "Great question. Having compared the profile with the reference, my answer is: {output}.",
    "Cell type annotation result -> {output}",
    "Judging from the gene expression pattern, I'd say it is a {output} (high confidence).",
    "The predicted response of this cell to {drug} is: {output}.",
    "Taking into account the sequencing method {sequencing_method} and the species {species}, the cell "
    "belongs to the {output} category.",
    "The profile strongly suggests {output}. Further validation with marker staining could confirm it.",
    "It appears to be {output}, based on the provided data.",
    "Output: '{output}'",
    "Hi! After careful analysis, I've determined that the cell's label is {output}. "
    "Good luck with your research!",
]


def _measure_module():
    return load_script("examples/measure_answer_extraction.py", "measure_answer_extraction")


@pytest.mark.parametrize(
    ("text", "labels", "expected"),
    [
        # substrings of each other: the longest mention wins
        ("It is a CD4 T cell.", ["T cell", "CD4 T cell"], "CD4 T cell"),
        ("It is a T cell.", ["T cell", "CD4 T cell"], "T cell"),
        ("This looks like a CD4+ T-cell.", ["T cell", "CD4 T cell"], "CD4 T cell"),
        ("The cell is Ngn3 low EP.", ["Ngn3 low EP", "Ngn3 high EP"], "Ngn3 low EP"),
        ("ngn3-HIGH EPs", ["Ngn3 low EP", "Ngn3 high EP"], "Ngn3 high EP"),
        ("The cell is an NK/T cell.", LABEL_SETS["He-2020-Liver"], "NK/T Cell"),
        ("The cell is an NK T cell.", LABEL_SETS["He-2020-Liver"], "NK/T Cell"),
        # case, plural, hyphen/space, punctuation
        ("cd14+ monocyte", LABEL_SETS["kang2018_pbmc_ifnb_muscat"], "CD14+ Monocytes"),
        ("These are CD14+ monocytes!", LABEL_SETS["kang2018_pbmc_ifnb_muscat"], "CD14+ Monocytes"),
        ("FCGR3A+ monocyte", LABEL_SETS["kang2018_pbmc_ifnb_muscat"], "FCGR3A+ Monocytes"),
        ("a CD8+ T-cell", LABEL_SETS["kang2018_pbmc_ifnb_muscat"], "CD8 T cells"),
        ("It's a b-cell.", LABEL_SETS["kang2018_pbmc_ifnb_muscat"], "B cells"),
        ("pre endocrine", LABEL_SETS["bastidas_ponce_2019_pancreas"], "Pre-endocrine"),
        ("preendocrine cells", LABEL_SETS["bastidas_ponce_2019_pancreas"], "Pre-endocrine"),
        ("Tcells", ["T cell", "B cell"], "T cell"),
        ("Activated stellate cell.", LABEL_SETS["baron2016_pancreas_human_mini_cider"], "activated_stellate"),
        ("TAC-2", LABEL_SETS["Ma-2020"], "TAC-2"),
        ("The answer is TAC 1.", LABEL_SETS["Ma-2020"], "TAC-1"),
        ("This is an ORS cell.", LABEL_SETS["Ma-2020"], "ORS"),
        (
            "The cell is CD4+/CD45RA+/CD25- naive T.",
            LABEL_SETS["pbmc68k_reduced_counts"],
            "CD4+/CD45RA+/CD25- Naive T",
        ),
        ("CD4+ / CD25 T-reg", LABEL_SETS["pbmc68k_reduced_counts"], "CD4+/CD25 T Reg"),
        ("a CD8+ cytotoxic T cell", LABEL_SETS["zheng2017_sorted_pbmc"], "CD8+ cytotoxic T cell"),
        ("  Beta  ", LABEL_SETS["Xin-2016"], "Beta"),
        # a conversational sentence with one mention; the label mentioned twice is still one label
        (
            "Sure! Based on insulin expression this is a beta cell; beta cells make insulin.",
            LABEL_SETS["Xin-2016"],
            "Beta",
        ),
        ("The cell is sensitive to erlotinib.", LABEL_SETS["pc9_erlotinib_day11_dsp"], "sensitive"),
        # unanswered: none or several labels
        ("Either alpha or beta.", LABEL_SETS["Xin-2016"], None),
        ("I cannot tell from this profile.", LABEL_SETS["Xin-2016"], None),
        ("", LABEL_SETS["Xin-2016"], None),
        (None, LABEL_SETS["Xin-2016"], None),
        ("Alphabet soup", LABEL_SETS["Xin-2016"], None),
        ("CD4 T cells or CD8 T cells", LABEL_SETS["kang2018_pbmc_ifnb_muscat"], None),
    ],
)
def test_extract_label_cases(text, labels, expected):
    assert extract_label(text, labels) == expected


def test_signs_kept_when_labels_differ_only_by_them():
    labels = ["CD25+ T", "CD25- T"]
    extractor = AnswerExtractor(labels)
    assert not extractor.relaxed
    assert extractor("A CD25- T cell") == "CD25- T"
    assert extractor("A cd25+ T cell") == "CD25+ T"


def test_indistinguishable_labels_are_rejected():
    with pytest.raises(ValueError, match="merge or rename"):
        AnswerExtractor(["B cell", "B cells"])
    with pytest.raises(ValueError, match="empty"):
        AnswerExtractor([])
    with pytest.raises(ValueError, match="not one string"):
        extract_label("Beta", "Beta")


@pytest.mark.parametrize("name", sorted(LABEL_SETS))
def test_every_template_with_every_label(name):
    measure = _measure_module()
    report = measure.measure(RESPONSE_TEMPLATES, {name: LABEL_SETS[name]})
    assert report["failures"] == []
    assert report["accuracy"] == 1.0


def test_measurement_script_end_to_end(tmp_path, capsys):
    templates = tmp_path / "templates.json"
    templates.write_text(
        json.dumps([{"instruction": "Which type? {input}", "response": t} for t in RESPONSE_TEMPLATES])
    )
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps(LABEL_SETS))
    report = _measure_module().main(
        ["--templates", str(templates), "--labels", str(labels), "--output", str(tmp_path / "report.json")]
    )
    n_labels = sum(len(v) for v in LABEL_SETS.values())
    assert report["n"] == len(RESPONSE_TEMPLATES) * n_labels
    assert report["accuracy"] == 1.0
    assert "accuracy: 100.0000%" in capsys.readouterr().out
    assert json.loads((tmp_path / "report.json").read_text())["n_templates"] == len(RESPONSE_TEMPLATES)


def test_fill_uses_defaults_for_other_placeholders():
    measure = _measure_module()
    assert measure.fill("{output} from {species}", "Beta", values={"species": "mouse"}) == "Beta from mouse"
    assert measure.fill("{output} via {unknown_field}", "Beta") == "Beta via unknown field"
