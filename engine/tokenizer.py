"""Text <-> token ids: a Hugging Face tokenizer for real checkpoints, bytes for dummy models.

Both classes expose the same small surface: ``encode``, ``decode``, ``apply_chat_template``,
``eos_token_id``, ``bos_token_id`` and ``vocab_size``.
"""

from __future__ import annotations

from pathlib import Path

from engine.dummy import BYTE_BOS_ID, BYTE_EOS_ID, dummy_config
from engine.model_config import ModelLoadError


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255, BOS is 256, EOS is 257; any other id (up to the model's
    vocabulary) decodes to a visible placeholder ``<|id|>``.

    The chat template is one line per message, ``<|role|>\\ncontent\\n``, preceded by BOS and
    followed by ``<|assistant|>\\n`` when a generation prompt is asked for.
    """

    bos_token_id = BYTE_BOS_ID
    eos_token_id = BYTE_EOS_ID

    def __init__(self, vocab_size: int):
        if vocab_size <= BYTE_EOS_ID:
            raise ValueError(f"a byte tokenizer needs a vocabulary above {BYTE_EOS_ID}, "
                             f"got {vocab_size}")
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        """The UTF-8 bytes of ``text`` (no BOS: chat prompts get it from the template)."""
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Bytes are joined and decoded (invalid UTF-8 becomes U+FFFD); BOS/EOS are dropped
        unless ``skip_special_tokens`` is False; other ids become ``<|id|>``."""
        pieces: list[str] = []
        run = bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                run.append(i)
                continue
            pieces.append(run.decode("utf-8", errors="replace"))
            run.clear()
            if i == BYTE_BOS_ID:
                pieces.append("" if skip_special_tokens else "<|bos|>")
            elif i == BYTE_EOS_ID:
                pieces.append("" if skip_special_tokens else "<|eos|>")
            else:
                pieces.append(f"<|{i}|>")
        pieces.append(run.decode("utf-8", errors="replace"))
        return "".join(pieces)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tokenize: bool = True) -> list[int] | str:
        """messages: ``[{"role": ..., "content": ...}]``. Returns ids (BOS first) or the text."""
        text = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages)
        if add_generation_prompt:
            text += "<|assistant|>\n"
        return [BYTE_BOS_ID] + self.encode(text) if tokenize else text


# At least one of these holds the vocabulary. Without them transformers 5 quietly builds an
# empty tokenizer from the config's model_type, so their absence is checked first.
VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


class HFTokenizer:
    """A thin wrapper over ``transformers.AutoTokenizer`` giving plain ``list[int]`` results."""

    def __init__(self, folder: str | Path):
        from transformers import AutoTokenizer

        if not any((Path(folder) / name).is_file() for name in VOCABULARY_FILES):
            raise ModelLoadError(f"no tokenizer in {folder}: expected one of "
                                 f"{', '.join(VOCABULARY_FILES)}")
        try:
            self.hf = AutoTokenizer.from_pretrained(str(folder), use_fast=True,
                                                    trust_remote_code=False)
        except Exception as e:  # noqa: BLE001 - a broken file raises anything (KeyError, ...)
            raise ModelLoadError(f"cannot load a tokenizer from {folder}: "
                                 f"{type(e).__name__}: {e}") from e
        self.folder = str(folder)

    @property
    def eos_token_id(self) -> int | None:
        return self.hf.eos_token_id

    @property
    def bos_token_id(self) -> int | None:
        return self.hf.bos_token_id

    @property
    def vocab_size(self) -> int:
        """Base vocabulary plus added tokens (the largest id the tokenizer can emit, plus one)."""
        return len(self.hf)

    def encode(self, text: str) -> list[int]:
        """Ids of ``text``, with the special tokens (e.g. BOS) this tokenizer adds by default."""
        return list(self.hf.encode(text))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tokenize: bool = True) -> list[int] | str:
        """Render the tokenizer's own chat template; the rendered text already holds any BOS,
        so it is encoded without adding special tokens again."""
        if not self.hf.chat_template:
            raise ValueError(f"the tokenizer in {self.folder} has no chat template")
        text = self.hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                           tokenize=False)
        return list(self.hf.encode(text, add_special_tokens=False)) if tokenize else text


def load_tokenizer(model: str) -> ByteTokenizer | HFTokenizer:
    """The tokenizer of a local Hugging Face folder, or a ``ByteTokenizer`` for ``dummy:NAME``."""
    if model.startswith("dummy:"):
        return ByteTokenizer(dummy_config(model).vocab_size)
    if not Path(model).is_dir():
        raise ModelLoadError(f"model {model!r} is neither a local folder nor a dummy:NAME model")
    return HFTokenizer(model)
