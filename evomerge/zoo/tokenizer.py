"""A character-level HF tokenizer for the demo zoo, built with `tokenizers` (no download).

Why character level: every skill (digits, letter strings, short words) tokenizes the same way
whatever surrounds it, so lm-eval's `context + target_delimiter + choice` split is exact and
generated text decodes back to the very characters the model produced. There is no
post-processor: nothing (no BOS) is ever added to an encoding, so lm-eval's HFLM sees the same
token ids whether it asks for special tokens or not, and they match what the model was trained on.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK)
# Every character the zoo's data uses; anything else encodes to <unk>.
CHARS: str = "\n abcdefghijklmnopqrstuvwxyz0123456789+=:>.,?-"
VOCAB: tuple[str, ...] = SPECIAL_TOKENS + tuple(CHARS)
MODEL_MAX_LENGTH = 128


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The zoo tokenizer: one token per character, ids fixed by `VOCAB` order."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Isolate every single character, newlines included.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()  # concatenate tokens, no spaces added between them
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        clean_up_tokenization_spaces=False,
        model_max_length=MODEL_MAX_LENGTH,
        padding_side="right",
    )


def save_tokenizer(out_dir: Path) -> None:
    """Write tokenizer.json and its configs so `AutoTokenizer.from_pretrained(out_dir)` loads it."""
    build_tokenizer().save_pretrained(str(out_dir))
