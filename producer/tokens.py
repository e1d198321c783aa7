"""The model's own tokenizer, without torch: `tokenizers` reads `tokenizer.json` directly."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from tokenizers import Encoding, Tokenizer

from config.errors import ConfigError
from config.settings import Settings

# Pre-tokenizers that cut at every whitespace: no token spans a space, so the tokens of
# " ".join(texts) are the tokens of each text, and counts add up without encoding the join.
WHITESPACE_SPLITTING = {"BertPreTokenizer", "Whitespace", "WhitespaceSplit", "Metaspace"}


@dataclass(frozen=True)
class ModelTokenizer:
    tokenizer: Tokenizer
    max_seq_length: int
    n_special: int
    # Whether token counts of texts joined by a space add up (see WHITESPACE_SPLITTING).
    additive: bool = False

    def count(self, texts: list[str]) -> list[int]:
        """Token counts without special tokens."""
        return [len(e.ids) for e in self.encode(texts)] if texts else []

    def count_with_specials(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=True).ids)

    def encode(self, texts: list[str]) -> list[Encoding]:
        """Encodings without special tokens, in one batch call (the fast tokenizer's threads)."""
        return self.tokenizer.encode_batch(texts, add_special_tokens=False)


def load_tokenizer(settings: Settings) -> ModelTokenizer:
    return _load(settings.model_source(), settings.model_revision)


@lru_cache(maxsize=4)
def _load(source: str, revision: str | None) -> ModelTokenizer:
    tokenizer_file = _model_file(source, revision, "tokenizer.json")
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    # tokenizer.json often carries the training-time truncation and padding: we count, not pad.
    tokenizer.no_truncation()
    tokenizer.no_padding()
    config = json.loads(_model_file(source, revision, "sentence_bert_config.json").read_text())
    max_seq_length = int(config["max_seq_length"])
    n_special = len(tokenizer.encode("", add_special_tokens=True).ids)
    return ModelTokenizer(tokenizer=tokenizer, max_seq_length=max_seq_length, n_special=n_special,
                          additive=_splits_on_whitespace(json.loads(tokenizer.to_str()).get("pre_tokenizer")))


def _splits_on_whitespace(pre_tokenizer: dict | None) -> bool:
    if not pre_tokenizer:
        return False
    if pre_tokenizer.get("type") == "Sequence":
        return any(_splits_on_whitespace(p) for p in pre_tokenizer.get("pretokenizers", []))
    # Metaspace may be told not to split ("split": false): then words run together.
    return pre_tokenizer.get("type") in WHITESPACE_SPLITTING and pre_tokenizer.get("split", True)


def _model_file(source: str, revision: str | None, filename: str) -> Path:
    local = Path(source)
    if local.is_dir():
        path = local / filename
        if not path.is_file():
            raise ConfigError(f"model directory {source} has no {filename}")
        return path
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(source, filename, revision=revision))
    except (LocalEntryNotFoundError, HFValidationError, OSError) as exc:
        raise ConfigError(f"cannot load {filename} of model {source!r}: {exc}") from exc
