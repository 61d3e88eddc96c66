"""Training examples: validation, rendering to token ids + loss mask, and the durable example store.

- `Renderer` turns a `weightshare.v1.Example` into a `TokenizedExample`. Chat examples are rendered with
  the served model's tokenizer and chat template; the loss mask covers assistant turns only, found by
  rendering prefixes: the tokens of assistant turn i are those of `messages[:i+1]` past those of
  `messages[:i]` + the generation prompt. Work is bounded before it is done: the message count and the
  characters are checked first, then the whole conversation is rendered and tokenized once and checked
  against max_seq_len, and only then are the prefixes rendered, as text only: a prefix's token count is
  read off the whole conversation's token offsets (a prefix is tokenized on its own only where its end
  falls inside a token or the tokenizer gives no offsets). Token examples are taken as given. Every
  problem raises `ExampleError` naming the field and the value, with a stable reason and the field in its
  metadata (weightshare/status.py; the service answers INVALID_ARGUMENT or FAILED_PRECONDITION with them).
  Text examples (prompt/completion, raw text with a mask) use no chat template: each segment is tokenized
  on its own and the token lists are concatenated, so every token belongs to one segment and the mask is
  exact by construction (tokenizing the whole text would make tokens that straddle a boundary, e.g. a
  prompt ending in a space and a completion starting with a word, belong to both segments; and a prompt
  is tokenized alone at inference, so its tokens here are the ones the model sees there). The special
  tokens the tokenizer adds to one sequence (read once off a probe: a BOS token for Llama-family
  tokenizers, none for Qwen's) go around the whole once. Work is bounded the same way: the segment count
  and the characters first, then one batched tokenization, then max_seq_len. (A tokenizer that prefixes
  every text it tokenizes with a space, as legacy SentencePiece ones for Llama 2 do, adds one at each
  segment's start: a segment that continues a word mid-way then reads as a new word.)
- `ExampleStore` is an append-only JSONL file in the trainer's state dir. `append` writes and fsyncs
  before it returns, so an acknowledged example survives a crash. Examples are consumed in order; the
  number consumed (the cursor) is saved with each checkpoint, so a restart resumes at that cursor and
  loses nothing (examples consumed after the last checkpoint are trained on again: at least once).

Relies on transformers (tokenizer), protobuf and grpc (status codes); no torch. Tests:
.venv/bin/python -m pytest tests/test_trainer_data.py -q
"""

from __future__ import annotations

import bisect
import itertools
import json
import os
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

import grpc
import structlog

from weightshare.grpc_util import shown
from weightshare.status import StatusError
from weightshare.v1 import trainer_service_pb2 as pb

log = structlog.get_logger(__name__)
ROLES = ("system", "user", "assistant")
STORE_FILE = "examples.jsonl"
TRAINED_FILE = "trained_cursor"  # examples trained into the served weights, rewritten at every commit
# No tokenizer has a sound characters-per-token bound (a WordLevel or BPE model may map any run of
# unknown characters to one token), so this is a generous cap, not a proof: real tokenizers average
# 3-5 characters a token and their longest tokens (whitespace, "====" runs) are tens of characters, so a
# conversation averaging more than 64 a token is refused before its template is rendered.
MAX_CHARS_PER_TOKEN = 64


class ExampleError(StatusError, ValueError):
    """An example the trainer cannot use: the message, a stable `reason` (weightshare/status.py), the gRPC
    `code` to answer with, and the request `field` at fault (in `metadata`) where one is known."""

    def __init__(
        self, message: str, *, reason: str, code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT,
        field: str | None = None,
    ):
        super().__init__(code, reason, message, {"field": field} if field else None)


@dataclass(frozen=True)
class TokenizedExample:
    """One example ready for the loop: token ids and a same-length loss mask."""

    example_id: str
    """Client-chosen or server-assigned id."""
    input_ids: tuple[int, ...]
    """Token ids of the whole sequence."""
    loss_mask: tuple[bool, ...]
    """True where the token is a training target (predicted from the tokens before it)."""

    @property
    def target_tokens(self) -> int:
        # Position 0 has nothing before it, so it can never be predicted.
        return sum(self.loss_mask[1:])

    def to_json(self) -> str:
        return json.dumps(
            {"id": self.example_id, "input_ids": list(self.input_ids), "loss_mask": [int(m) for m in self.loss_mask]},
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, line: str) -> TokenizedExample:
        record = json.loads(line)
        return cls(record["id"], tuple(record["input_ids"]), tuple(bool(m) for m in record["loss_mask"]))


class _TemplateRefused(Exception):
    """The chat template raised (its own `raise_exception`, or a rendering error)."""


class Renderer:
    """Validates examples and renders them to tokens for one model (vocabulary size, chat template)."""

    def __init__(self, tokenizer, vocab_size: int, max_seq_len: int):
        """`tokenizer`: a transformers tokenizer, or None (then only token examples are accepted)."""
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_seq_len = max_seq_len
        self._offsets_tokenizer = _offsets_tokenizer(tokenizer)
        # The special tokens the tokenizer adds to one sequence (before, after), for text examples.
        self._sequence_specials = _sequence_special_tokens(tokenizer) if tokenizer is not None else ([], [])

    def render(self, example: pb.Example, index: int = 0) -> TokenizedExample:
        """Tokens and loss mask of `example` (`examples[index]` of a request, for error messages)."""
        where = f"examples[{index}]"
        kind = example.WhichOneof("content")
        example_id = example.example_id or uuid.uuid4().hex
        if kind == "chat":
            try:
                ids, mask = self._render_chat(example.chat, where)
            except _TemplateRefused as err:
                raise ExampleError(f"{where}.chat: the served model's chat template refused these messages: {err}",
                                   reason="CHAT_TEMPLATE_REFUSED", field=f"{where}.chat.messages")
        elif kind == "tokens":
            ids, mask = self._check_tokens(example.tokens, where)
        elif kind == "text":
            ids, mask = self._render_text(example.text, where)
        else:
            raise ExampleError(f"{where}: content is not set: give chat, text or tokens",
                               reason="EXAMPLE_CONTENT_MISSING", field=where)
        if len(ids) > self.max_seq_len:
            raise self._too_long(where, len(ids))
        result = TokenizedExample(example_id, tuple(ids), tuple(mask))
        if result.target_tokens == 0:
            raise ExampleError(f"{where}: no training target: the loss mask is false past the first token",
                               reason="NO_TRAINING_TARGET", field=where)
        return result

    def _check_tokens(self, tokens: pb.TokenExample, where: str) -> tuple[list[int], list[bool]]:
        ids, mask = list(tokens.input_ids), list(tokens.loss_mask)
        if not ids:
            raise ExampleError(f"{where}.tokens.input_ids is empty", reason="EXAMPLE_FIELD_EMPTY",
                               field=f"{where}.tokens.input_ids")
        if len(mask) != len(ids):
            raise ExampleError(
                f"{where}.tokens.loss_mask has {len(mask)} entries but input_ids has {len(ids)}: same length needed",
                reason="LOSS_MASK_LENGTH_MISMATCH", field=f"{where}.tokens.loss_mask",
            )
        for i, token in enumerate(ids):
            if token >= self.vocab_size:
                raise ExampleError(
                    f"{where}.tokens.input_ids[{i}] = {token} is not below the vocabulary size {self.vocab_size}",
                    reason="TOKEN_OUT_OF_VOCABULARY", field=f"{where}.tokens.input_ids[{i}]",
                )
        return ids, mask

    def _too_long(self, where: str, tokens: int) -> ExampleError:
        return ExampleError(
            f"{where}: {tokens} tokens is longer than the trainer's max_seq_len {self.max_seq_len}: "
            "shorten it, or restart `weightshare train` with a larger --max-seq-len",
            reason="EXAMPLE_TOO_LONG", field=where,
        )

    def _render_text(self, text: pb.TextExample, where: str) -> tuple[list[int], list[bool]]:
        segments = text.segments
        if not segments:
            raise ExampleError(f"{where}.text.segments is empty", reason="EXAMPLE_FIELD_EMPTY",
                               field=f"{where}.text.segments")
        # Cheap bounds before any tokenizing, as for chat: the segment count, then the characters.
        if len(segments) > self.max_seq_len:
            raise ExampleError(
                f"{where}.text.segments has {len(segments)} segments, more than the trainer's max_seq_len "
                f"{self.max_seq_len}: shorten it (or join segments), or restart `weightshare train` with a "
                "larger --max-seq-len", reason="EXAMPLE_TOO_LONG", field=f"{where}.text.segments",
            )
        for j, segment in enumerate(segments):
            if not segment.text:
                raise ExampleError(f"{where}.text.segments[{j}].text is empty: drop the segment",
                                   reason="EXAMPLE_FIELD_EMPTY", field=f"{where}.text.segments[{j}].text")
        trained = [j for j, segment in enumerate(segments) if segment.train]
        if not trained:
            raise ExampleError(f"{where}.text.segments has no segment with train = true: nothing to train on",
                               reason="NO_TRAINING_TARGET", field=f"{where}.text.segments")
        self._check_characters(sum(len(segment.text) for segment in segments), f"{where}.text.segments",
                               "characters")
        if self.tokenizer is None:
            raise ExampleError(
                f"{where}.text: the trainer has no tokenizer for the served model: submit tokens instead",
                reason="TOKENIZER_MISSING", code=grpc.StatusCode.FAILED_PRECONDITION, field=f"{where}.text",
            )
        eos = None
        if text.add_eos:
            eos = self.tokenizer.eos_token_id
            if eos is None:
                raise ExampleError(
                    f"{where}.text.add_eos: the served model's tokenizer has no eos token: set add_eos false "
                    "and end the last segment's text with what should end it",
                    reason="EOS_TOKEN_MISSING", code=grpc.StatusCode.FAILED_PRECONDITION,
                    field=f"{where}.text.add_eos",
                )
        # Each segment on its own (one batched call), never merged across a boundary: the mask is exact.
        pieces = self.tokenizer([segment.text for segment in segments], add_special_tokens=False)["input_ids"]
        before, after = self._sequence_specials
        last_trains = segments[-1].train
        ids, mask = list(before), [False] * len(before)
        for segment, piece in zip(segments, pieces, strict=True):
            ids += piece
            mask += [segment.train] * len(piece)
        ids += after
        mask += [last_trains] * len(after)
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
            mask.append(last_trains)
        if len(ids) > self.max_seq_len:
            raise self._too_long(where, len(ids))
        if not any(mask[1:]):
            names = ", ".join(f"segments[{j}]" for j in trained)
            raise ExampleError(
                f"{where}.text: the trained segments ({names}) give no training target: they tokenize to no "
                "tokens, or only to the first token, which nothing precedes to predict it from",
                reason="NO_TRAINING_TARGET", field=f"{where}.text.segments",
            )
        return ids, mask

    def _render_chat(self, chat: pb.ChatExample, where: str) -> tuple[list[int], list[bool]]:
        if not chat.messages:
            raise ExampleError(f"{where}.chat.messages is empty", reason="EXAMPLE_FIELD_EMPTY",
                               field=f"{where}.chat.messages")
        # Cheap bounds before any rendering. Every chat template wraps each message in at least a role
        # marker or a separator, so each message renders to at least one token.
        if len(chat.messages) > self.max_seq_len:
            raise ExampleError(
                f"{where}.chat.messages has {len(chat.messages)} messages, more than the trainer's max_seq_len "
                f"{self.max_seq_len} tokens can hold: shorten it, or restart `weightshare train` with a larger "
                "--max-seq-len", reason="EXAMPLE_TOO_LONG", field=f"{where}.chat.messages",
            )
        messages = [{"role": m.role, "content": m.content} for m in chat.messages]
        for i, message in enumerate(messages):
            if message["role"] not in ROLES:
                raise ExampleError(
                    f"{where}.chat.messages[{i}].role = {shown(message['role'])} is not one of {', '.join(ROLES)}",
                    reason="ROLE_INVALID", field=f"{where}.chat.messages[{i}].role",
                )
        assistant_turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if not assistant_turns:
            raise ExampleError(f"{where}.chat.messages has no assistant turn: nothing to train on",
                               reason="NO_TRAINING_TARGET", field=f"{where}.chat.messages")
        for i in assistant_turns:
            if not messages[i]["content"].strip():
                raise ExampleError(
                    f"{where}.chat.messages[{i}].content is empty: an assistant turn must say what to learn",
                    reason="EXAMPLE_FIELD_EMPTY", field=f"{where}.chat.messages[{i}].content",
                )
        self._check_characters(sum(len(m["content"]) for m in messages), f"{where}.chat.messages",
                               "characters of content")
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ExampleError(
                f"{where}.chat: the served model's tokenizer has no chat template: submit tokens instead",
                reason="CHAT_TEMPLATE_MISSING", code=grpc.StatusCode.FAILED_PRECONDITION, field=f"{where}.chat",
            )
        # One render of the whole conversation, checked against max_seq_len before any prefix is rendered.
        text = self._text(messages, add_generation_prompt=False)
        ids = self._tokenize(text)
        if len(ids) > self.max_seq_len:
            raise self._too_long(where, len(ids))
        offsets = self._offsets(text, ids)
        mask = [False] * len(ids)
        for turn in assistant_turns:
            start = self._prefix_tokens(messages[:turn], True, text, ids, offsets)[0] if turn else 0
            end, is_prefix = self._prefix_tokens(messages[: turn + 1], False, text, ids, offsets)
            # Rendering prefixes is only valid if the template renders a conversation as the
            # concatenation of its turns; a template that rewrites earlier turns breaks this.
            if not is_prefix or start > end:
                raise ExampleError(
                    f"{where}.chat: the chat template does not render messages[:{turn + 1}] as a prefix of the "
                    "whole conversation, so assistant tokens cannot be located: submit tokens instead",
                    reason="CHAT_TEMPLATE_UNSUPPORTED", code=grpc.StatusCode.FAILED_PRECONDITION,
                    field=f"{where}.chat",
                )
            for i in range(start, end):
                mask[i] = True
        return ids, mask

    def _prefix_tokens(
        self, messages: list[dict], add_generation_prompt: bool, text: str, ids: list[int],
        offsets: tuple[list[int], list[int]] | None,
    ) -> tuple[int, bool]:
        """(len(tokens of `messages` rendered), whether those tokens are a prefix of `ids`), where `ids`
        are the tokens of the whole conversation `text`.

        Where the rendered prefix is a prefix of `text` and ends between two of its tokens (per
        `offsets`), it tokenizes to exactly the tokens before that point: tokenizers split their input
        at added tokens, pre-tokenize with patterns that match the same way up to a pre-token boundary,
        and BPE, WordPiece and WordLevel models never merge across a boundary that the whole text's
        tokens do not cross. Elsewhere the prefix is tokenized, as it was before offsets were used.
        """
        prefix = self._text(messages, add_generation_prompt)
        if offsets is not None and text.startswith(prefix):
            starts, ends = offsets
            cut = len(prefix)
            n = bisect.bisect_right(ends, cut)  # tokens that end at or before the cut
            inside = n < len(ids) and starts[n] < cut
            zero_width = n > 0 and starts[n - 1] == ends[n - 1] == cut  # in the prefix or not: unknown
            if not inside and not zero_width:
                return n, True
        upto = self._tokenize(prefix)
        return len(upto), ids[: len(upto)] == upto

    def _offsets(self, text: str, ids: list[int]) -> tuple[list[int], list[int]] | None:
        """(start, end) character offsets of `ids`, the tokens of `text`, or None where they are not known.

        They come from a copy of the fast tokenizer without its post-processor, which may trim a token's
        leading space off its offsets (ByteLevel, Roberta) and so hide a prefix that ends inside a token.
        """
        if self._offsets_tokenizer is None:
            return None
        encoding = self._offsets_tokenizer.encode(text, add_special_tokens=False)
        if encoding.ids != ids:
            return None
        starts = [s for s, _ in encoding.offsets]
        ends = [e for _, e in encoding.offsets]
        ordered = all(a <= b for a, b in itertools.pairwise(starts)) and all(a <= b for a, b in itertools.pairwise(ends))
        return (starts, ends) if ordered and all(s <= e for s, e in encoding.offsets) else None

    def _check_characters(self, chars: int, field: str, what: str) -> None:
        """Refuses more characters than MAX_CHARS_PER_TOKEN per allowed token, before any tokenizing."""
        limit = MAX_CHARS_PER_TOKEN * self.max_seq_len
        if chars > limit:
            raise ExampleError(
                f"{field} hold {chars} {what}, more than {MAX_CHARS_PER_TOKEN} a token of the trainer's "
                f"max_seq_len {self.max_seq_len} ({limit}): shorten it, or restart `weightshare train` with a "
                "larger --max-seq-len",
                reason="EXAMPLE_TOO_LONG", field=field,
            )

    def _text(self, messages: list[dict], add_generation_prompt: bool) -> str:
        if not messages:
            return ""
        from jinja2 import TemplateError

        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except TemplateError as err:  # the template's own raise_exception(), e.g. roles out of order
            raise _TemplateRefused(str(err)) from None

    def _tokenize(self, text: str) -> list[int]:
        if not text:
            return []
        # The template already contains any special tokens; adding BOS again would shift the mask.
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def _sequence_special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """(tokens before, tokens after) that `tokenizer` adds around one sequence (BOS, EOS), read off a probe."""
    probe = "hello"
    bare = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    full = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    for start in range(len(full) - len(bare) + 1):
        if bare and full[start : start + len(bare)] == bare:
            return full[:start], full[start + len(bare) :]
    log.warning("cannot tell which special tokens the tokenizer adds to a sequence: text examples get none",
                probe=probe, without_special_tokens=bare, with_special_tokens=full)
    return [], []


def _offsets_tokenizer(tokenizer):
    """A copy of `tokenizer`'s Rust tokenizer without post-processor, truncation or padding; None if not fast."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is None:
        return None
    from tokenizers import Tokenizer

    copy = Tokenizer.from_str(backend.to_str())
    copy.post_processor = None
    copy.no_truncation()
    copy.no_padding()
    copy.encode_special_tokens = bool(getattr(tokenizer, "split_special_tokens", False))
    return copy


class ExampleStore:
    """Append-only, fsync'd JSONL of tokenized examples, consumed in order. Thread-safe."""

    def __init__(self, state_dir: str | Path, cursor: int = 0):
        """Opens (or creates) `state_dir/examples.jsonl`; `cursor` examples count as already consumed."""
        self.path = Path(state_dir) / STORE_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Condition()
        self._examples: list[TokenizedExample] = self._load()
        self._ids = {e.example_id for e in self._examples}
        if not 0 <= cursor <= len(self._examples):
            raise ValueError(f"cursor {cursor} is outside the store's {len(self._examples)} examples ({self.path})")
        self._cursor = cursor
        self._file = open(self.path, "ab")  # noqa: SIM115 (held open for the store's lifetime; close())
        trained = self.path.parent / TRAINED_FILE
        # Read before anything trains: what the previous run had trained, checkpointed or not.
        self.trained_by_previous_run = int(trained.read_text() or 0) if trained.exists() else cursor
        self._trained_fd = os.open(trained, os.O_RDWR | os.O_CREAT, 0o600)

    def _load(self) -> list[TokenizedExample]:
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        # A crash mid-append leaves a partial last line: that example was never acknowledged, drop it.
        complete = data[: data.rfind(b"\n") + 1]
        if len(complete) != len(data):
            log.warning("dropping a partial last line of the example store", path=str(self.path),
                        bytes=len(data) - len(complete))
            with open(self.path, "r+b") as f:
                f.truncate(len(complete))
                os.fsync(f.fileno())
        return [TokenizedExample.from_json(line) for line in complete.decode().splitlines() if line]

    def append(self, examples: list[TokenizedExample]) -> int:
        """Persists `examples` (all or none) and returns how many are pending afterwards."""
        with self._lock:
            seen = set()
            for i, e in enumerate(examples):
                if e.example_id in seen:
                    raise ExampleError(
                        f"examples[{i}].example_id {shown(e.example_id)} appears twice in this request",
                        reason="EXAMPLE_ID_DUPLICATED", field=f"examples[{i}].example_id",
                    )
                if e.example_id in self._ids:
                    raise ExampleError(f"example_id {shown(e.example_id)} was already submitted",
                                       reason="EXAMPLE_ID_EXISTS", code=grpc.StatusCode.ALREADY_EXISTS,
                                       field=f"examples[{i}].example_id")
                seen.add(e.example_id)
            self._file.write("".join(e.to_json() + "\n" for e in examples).encode())
            self._file.flush()
            os.fsync(self._file.fileno())
            self._examples.extend(examples)
            self._ids.update(seen)
            self._lock.notify_all()
            return len(self._examples) - self._cursor

    def peek(self, n: int, timeout_s: float) -> list[TokenizedExample]:
        """Up to `n` pending examples, waiting at most `timeout_s` for the first; the cursor stays put.

        The loop calls `consume` once the step that used them is committed or skipped, so a step that
        fails half-way leaves its examples pending.
        """
        with self._lock:
            self._lock.wait_for(lambda: len(self._examples) > self._cursor, timeout=timeout_s)
            return self._examples[self._cursor : self._cursor + n]

    def consume(self, n: int) -> None:
        """Marks the next `n` pending examples as trained on."""
        with self._lock:
            assert self._cursor + n <= len(self._examples), "consuming more examples than are pending"
            self._cursor += n
            self._record_trained()

    def _record_trained(self) -> None:
        # Fixed width, written in place: a restart can say exactly how many examples it trains again.
        os.pwrite(self._trained_fd, f"{self._cursor:020d}".encode(), 0)
        os.fdatasync(self._trained_fd)

    def rewind(self, cursor: int) -> None:
        """Marks everything after the first `cursor` examples pending again (a restore to a checkpoint)."""
        with self._lock:
            if not 0 <= cursor <= len(self._examples):
                raise ValueError(f"cursor {cursor} is outside the store's {len(self._examples)} examples")
            self._cursor = cursor
            self._record_trained()
            self._lock.notify_all()

    def wait_for_pending(self, n: int, timeout_s: float) -> None:
        """Blocks until `n` examples are pending or `timeout_s` passes."""
        with self._lock:
            self._lock.wait_for(lambda: len(self._examples) - self._cursor >= n, timeout=timeout_s)

    @property
    def cursor(self) -> int:
        """Examples consumed so far."""
        with self._lock:
            return self._cursor

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._examples) - self._cursor

    @property
    def total(self) -> int:
        with self._lock:
            return len(self._examples)

    def close(self) -> None:
        self._file.close()
        os.close(self._trained_fd)
