"""Convert an original InstructCell checkpoint (zjunlp/InstructCell-chat, -instruct) to our format.

The output folder holds ``model.safetensors`` with this package's key names, a translated ``config.json``, the
processor (tokenizer + feature extractor with the gene vocabulary) and the remote-code files, so that
``AutoModel.from_pretrained(OUT, trust_remote_code=True)`` and ``AutoProcessor.from_pretrained(OUT, ...)``
work without this package installed.

Usage::

    python examples/convert_original_checkpoint.py zjunlp/InstructCell-chat ./InstructCell-chat-hf
    python examples/convert_original_checkpoint.py ./original_folder ./out --gene-vocab-file gene_vocab.npy

The published checkpoints read the original 18,961-gene vocabulary, which is shipped with the package (and
downloaded from the original repository when the copy is missing). Checkpoints with another gene count need
``--gene-names`` (a text file with one symbol per line, in the checkpoint's column order).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from instructcell.hub import save_for_hub
from modeling_instructcell import InstructCellForConditionalGeneration, InstructCellProcessor


def convert(
    source: str,
    output: str | Path,
    gene_names: Sequence[str] | None = None,
    gene_vocab_file: str | Path | None = None,
    revision: str | None = None,
) -> Path:
    """Load an original checkpoint (local folder or Hub id) and write it to ``output`` in our format.

    Parameters
    ----------
    source : str
        Folder or Hub id of an original InstructCell checkpoint.
    output : str or Path
        Output folder (created).
    gene_names : sequence of str, optional
        The checkpoint's gene vocabulary; defaults to the original 18,961 genes.
    gene_vocab_file : str or Path, optional
        A local copy of the original ``gene_vocab.npy`` (or a text file, one symbol per line).
    revision : str, optional
        Hub revision of ``source``.

    Returns
    -------
    Path
        The output folder.
    """
    hub_kwargs = {} if revision is None else {"revision": revision}
    model = InstructCellForConditionalGeneration.from_pretrained(source, **hub_kwargs)
    processor = InstructCellProcessor.from_pretrained(
        source,
        gene_names=None if gene_names is None else list(gene_names),
        gene_vocab_file=gene_vocab_file,
        **hub_kwargs,
    )
    return save_for_hub(model, processor, output)


def main(argv: Sequence[str] | None = None) -> Path:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "source", help="original checkpoint: local folder or Hub id (e.g. zjunlp/InstructCell-chat)"
    )
    parser.add_argument("output", help="output folder")
    parser.add_argument(
        "--gene-names", type=Path, help="text file, one gene symbol per line, checkpoint column order"
    )
    parser.add_argument("--gene-vocab-file", type=Path, help="local copy of the original gene_vocab.npy")
    parser.add_argument("--revision", help="Hub revision of the source")
    args = parser.parse_args(argv)
    gene_names = None
    if args.gene_names is not None:
        gene_names = [line.strip() for line in args.gene_names.read_text().splitlines() if line.strip()]
    output = convert(args.source, args.output, gene_names, args.gene_vocab_file, args.revision)
    print(f"wrote {output}")
    return output


if __name__ == "__main__":
    main()
