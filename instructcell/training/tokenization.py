"""Train a T5-style (Unigram SentencePiece) tokenizer on an instruction corpus, offline and deterministically.

With internet access the paper's tokenizer is ``AutoTokenizer.from_pretrained("google-t5/t5-base")``.
Without it, :func:`train_instruction_tokenizer` builds a small tokenizer of the same kind from the
template bank and label names with SentencePiece, T5's own trainer; save it with the processor.

The same corpus always gives the same pieces in the same order (the same token ids), so the same training
command builds the same model twice and every process of a multi-process run agrees on the ids. (The
``tokenizers`` Unigram trainer does not: it walks hash maps, so its piece order, and so the ids, changes
from one process to the next.)
"""

import io
import string
from collections.abc import Iterable

import sentencepiece
from transformers import T5Tokenizer

T5_SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2 as in t5-base
# every printable ASCII character is a piece, so that unseen words never become <unk>
ALPHABET = sorted(set(string.ascii_letters + string.digits + string.punctuation))


def train_instruction_tokenizer(corpus: Iterable[str], vocab_size: int = 4000) -> T5Tokenizer:
    """Train a Unigram tokenizer on ``corpus`` and wrap it as a ``T5Tokenizer``.

    Words are split at white space and marked with SentencePiece's ``▁``, as ``T5Tokenizer`` reads text; the
    text is not normalized. Printable ASCII characters missing from the corpus are appended after the
    trained pieces (lowest scores, sorted), so unseen words never become ``<unk>``.

    Parameters
    ----------
    corpus : iterable of str
        Instructions, responses, label names and metadata values.
    vocab_size : int
        Target vocabulary size (SentencePiece may return fewer pieces for a small corpus).

    Returns
    -------
    T5Tokenizer
        ``<pad>`` = 0, ``</s>`` = 1 (appended to every sequence), ``<unk>`` = 2, no sentinel tokens.

    Raises
    ------
    ValueError
        An empty corpus or a ``vocab_size`` too small to hold the special tokens and one piece.
    """
    texts = [" ".join(text.split()) for text in corpus if text and text.strip()]
    if not texts:
        raise ValueError("The tokenizer corpus is empty; pass instruction texts (e.g. the template bank).")
    if vocab_size <= len(T5_SPECIAL_TOKENS) + 1:
        raise ValueError(f"vocab_size must exceed {len(T5_SPECIAL_TOKENS) + 1}, got {vocab_size}.")
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        model_type="unigram",
        vocab_size=vocab_size,
        hard_vocab_limit=False,  # a small corpus yields fewer pieces instead of an error
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        normalization_rule_name="identity",
        max_sentence_length=1 << 20,  # keep long instructions instead of dropping them
        num_threads=1,  # one thread: the EM sums in a fixed order, so the scores do not vary between runs
        minloglevel=2,
    )
    trained = sentencepiece.SentencePieceProcessor(model_proto=model.getvalue())
    vocab = [(trained.id_to_piece(i), trained.get_score(i)) for i in range(trained.get_piece_size())]
    known = {piece for piece, _ in vocab}
    lowest = min(score for _, score in vocab[len(T5_SPECIAL_TOKENS) :])
    vocab += [(char, lowest - 1.0) for char in ALPHABET if char not in known]
    return T5Tokenizer(vocab=vocab, extra_ids=0)
