"""`tokenizer=char`: a character-level tokenizer built from the corpus (as nanoGPT's shakespeare_char).

Its vocabulary is `<eos>` (end of document, also padding), `<unk>` (characters the corpus lacks), then the
sorted characters of the whole corpus, one id each. It is an ordinary Hugging Face fast tokenizer: a
WordLevel model over a pre-tokenizer that isolates every character, and a decoder that joins them back.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from compactlm.config import Config
from compactlm.errors import CompactLMError
from compactlm.files import as_if_created

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

log = logging.getLogger(__name__)

CHAR = "char"  # the `tokenizer` value that asks for this tokenizer
EOS, UNK = "<eos>", "<unk>"
TOKENIZER_DIR = "tokenizer"  # in the run's out_dir


def build_char_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """A PreTrainedTokenizerFast over the sorted characters of `texts`, plus <eos> (eos and pad) and <unk>."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set().union(*map(set, texts)))
    vocab = {EOS: 0, UNK: 1} | {c: i for i, c in enumerate(chars, start=2)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character
    tok.decoder = decoders.Fuse()  # join the characters back with nothing in between
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS, unk_token=UNK,
                                   clean_up_tokenization_spaces=False)


def prepare_tokenizer(cfg: Config, out_dir: str | Path) -> Config:
    """With tokenizer=char: build it from cfg.data once into out_dir/tokenizer/ and point cfg.tokenizer there."""
    if cfg.tokenizer != CHAR:
        return cfg
    target = Path(out_dir) / TOKENIZER_DIR
    if (target / "tokenizer.json").is_file():
        log.info("tokenizer=char: reusing %s", target)
    else:
        from compactlm import data

        texts = data.load_texts(cfg.data, text_field=cfg.dataset.text_field, split=cfg.dataset.split,
                                max_chars=cfg.dataset.max_chars)
        tokenizer = build_char_tokenizer(texts)
        _save_atomically(tokenizer, target)
        log.info("tokenizer=char: %d tokens from %s, saved to %s", len(tokenizer), cfg.data, target)
    return dataclasses.replace(cfg, tokenizer=str(target))


def _save_atomically(tokenizer, target: Path) -> None:
    """save_pretrained into a temp dir beside `target`, renamed in; a copy already there (another rank) wins."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = as_if_created(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "tokenizer.json").is_file():
                raise CompactLMError(f"tokenizer=char: {target} exists but holds no tokenizer.json; remove it") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
