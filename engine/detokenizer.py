"""Incremental detokenization: token ids in, stable text out, stop strings applied.

Byte-level tokenizers (Llama 3, Qwen, the dummy byte tokenizer) can split one UTF-8 character
over several tokens; decoding a prefix that ends inside a character yields U+FFFD. So each call
decodes a short window of recent tokens, emits the window text that is new since the last call,
and holds back a trailing run of U+FFFD until later tokens complete the character (a U+FFFD that
is followed by other text is real invalid output and is emitted as is).

The window keeps a few tokens of context before the new ones, because some decoders treat a
sequence's first token specially (SentencePiece drops its leading space); text is measured as
growth of the window's decoded length, never by decoding single tokens. When the window grows
past ``MAX_WINDOW`` tokens it is cut back to its last ``CONTEXT_TOKENS``, so a call costs one
decode of at most ``MAX_WINDOW`` tokens however long the output gets.

Stop strings follow OpenAI's rule: the text ends just before the first occurrence, which may
straddle token boundaries. Text that could still turn into a stop string (a suffix that is a
prefix of one) is held back until it is decided; ``flush`` releases it when generation ends.
"""

from __future__ import annotations

from typing import Protocol

REPLACEMENT = "\ufffd"


class Decoder(Protocol):
    def decode(self, ids: list[int]) -> str: ...


class IncrementalDetokenizer:
    """Turns a growing list of generated token ids into text.

    Args:
        tokenizer: anything with ``decode(ids: list[int]) -> str`` (``engine.tokenizer``'s
            tokenizers; a Hugging Face tokenizer works too).
        prompt_token_ids: the prompt; its last tokens give the first generated ones context.
        stop: stop strings (empty strings are ignored).

    Attributes:
        stopped: True once a stop string appeared; later tokens are ignored.
        text: all text emitted so far (the concatenation of what ``add``/``flush`` returned).
    """

    CONTEXT_TOKENS = 5
    MAX_WINDOW = 16

    def __init__(self, tokenizer: Decoder, prompt_token_ids: list[int],
                 stop: list[str] | None = None):
        self._tokenizer = tokenizer
        self._stop = [s for s in (stop or []) if s]
        self._window = list(prompt_token_ids[-self.CONTEXT_TOKENS:])
        # Characters of the window's decoded text already accounted for (the prompt's, at first).
        self._consumed = len(self._decode(self._window))
        self._pending = ""  # decoded text not yet emitted because it may begin a stop string
        self._chunks: list[str] = []
        self.stopped = False

    @property
    def text(self) -> str:
        if len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""

    def add(self, new_token_ids: list[int]) -> str:
        """Append generated tokens; returns the newly emitted text (may be empty)."""
        if self.stopped or not new_token_ids:
            return ""
        self._window.extend(int(t) for t in new_token_ids)
        window_text = self._decode(self._window)
        end = len(window_text)
        while end > self._consumed and window_text[end - 1] == REPLACEMENT:
            end -= 1
        fresh = window_text[self._consumed:end]
        self._consumed = max(self._consumed, end)
        if len(self._window) > self.MAX_WINDOW:
            self._shrink_window(window_text)
        return self._emit(fresh, final=False)

    def flush(self) -> str:
        """Generation ended: release held-back text (an unfinished character decodes to U+FFFD,
        a partial stop string is plain text after all). Returns it."""
        if self.stopped:
            return ""
        window_text = self._decode(self._window)
        fresh = window_text[self._consumed:]
        self._consumed = len(window_text)
        return self._emit(fresh, final=True)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids) if ids else ""

    def _shrink_window(self, window_text: str) -> None:
        """Keep only the last CONTEXT_TOKENS tokens if the held-back tail decodes the same from
        there (it does unless a run of invalid bytes is longer than the context: then the
        window keeps growing until the run ends)."""
        tail_ids = self._window[-self.CONTEXT_TOKENS:]
        tail_text = self._decode(tail_ids)
        held = window_text[self._consumed:]
        if self._consumed > len(window_text) or not tail_text.endswith(held):
            return
        self._window = tail_ids
        self._consumed = len(tail_text) - len(held)

    def _emit(self, fresh: str, final: bool) -> str:
        text = self._pending + fresh
        cut = self._first_stop(text)
        if cut is not None:
            text, self._pending, self.stopped = text[:cut], "", True
        else:
            hold = 0 if final else self._stop_prefix_len(text)
            text, self._pending = text[:len(text) - hold], text[len(text) - hold:]
        if text:
            self._chunks.append(text)
        return text

    def _first_stop(self, text: str) -> int | None:
        """Index of the earliest stop string in ``text``. Only undecided text is searched: a stop
        string cannot begin in emitted text, since a possible beginning is always held back."""
        hits = [i for i in (text.find(s) for s in self._stop) if i >= 0]
        return min(hits) if hits else None

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        longest = min(len(text), max((len(s) - 1 for s in self._stop), default=0))
        for n in range(longest, 0, -1):
            suffix = text[-n:]
            if any(s.startswith(suffix) for s in self._stop):
                return n
        return 0
