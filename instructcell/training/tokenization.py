"""Train a T5-style (Unigram, SentencePiece-like) tokenizer on an instruction corpus, offline.

With internet access the paper's tokenizer is ``AutoTokenizer.from_pretrained("google-t5/t5-base")``.
Without it, :func:`train_instruction_tokenizer` builds a small tokenizer of the same kind from the
template bank and label names, with the ``tokenizers`` library; save it with the processor.
"""

import json
import string
from collections.abc import Iterable

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import T5Tokenizer

T5_SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2 as in t5-base


def train_instruction_tokenizer(corpus: Iterable[str], vocab_size: int = 4000) -> T5Tokenizer:
    """Train a Unigram tokenizer on ``corpus`` and wrap it as a ``T5Tokenizer``.

    Pre-tokenization matches ``T5Tokenizer`` (whitespace split, then SentencePiece's ``▁`` marker), and
    every printable ASCII character is in the alphabet, so unseen words never become ``<unk>``.

    Parameters
    ----------
    corpus : iterable of str
        Instructions, responses, label names and metadata values.
    vocab_size : int
        Target vocabulary size (the trainer may return fewer pieces for a small corpus).

    Returns
    -------
    T5Tokenizer
        ``<pad>`` = 0, ``</s>`` = 1 (appended to every sequence), ``<unk>`` = 2, no sentinel tokens.
    """
    texts = [text for text in corpus if text and text.strip()]
    if not texts:
        raise ValueError("The tokenizer corpus is empty; pass instruction texts (e.g. the template bank).")
    if vocab_size <= len(T5_SPECIAL_TOKENS) + 1:
        raise ValueError(f"vocab_size must exceed {len(T5_SPECIAL_TOKENS) + 1}, got {vocab_size}.")
    backend = Tokenizer(models.Unigram())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size,
        special_tokens=T5_SPECIAL_TOKENS,
        unk_token="<unk>",
        initial_alphabet=list(string.ascii_letters + string.digits + string.punctuation + "▁"),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    vocab = [(piece, float(score)) for piece, score in json.loads(backend.to_str())["model"]["vocab"]]
    return T5Tokenizer(vocab=vocab, extra_ids=0)
