"""`weightshare submit FILE|-`: send the training examples of a JSONL file (or stdin) to a running trainer.

Every line is parsed and validated before anything is sent; bad lines are reported as `FILE:LINE: problem`
(one per bad line) and nothing is sent (exit 2). Valid examples go to TrainerService.SubmitExamples in
batches of --batch-size, with a progress bar on a terminal (log lines otherwise). The trainer validates
again; a batch it refuses is reported with the file line of the offending example. With --wait the command
then follows StreamProgress and GetTrainingStatus until every sent example is trained, with a second bar,
and prints a one-line summary.

Relies on grpc, protobuf, structlog and tqdm only (no torch, no tokenizer: the trainer renders text with
the served model's tokenizer). Tests: .venv/bin/python -m pytest tests/test_submit.py -q
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import queue
import re
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import BinaryIO

import structlog

from weightshare.errors import UsageError
from weightshare.v1 import trainer_service_pb2 as pb

log = structlog.get_logger(__name__)
STDIN_NAME = "<stdin>"
MAX_BATCH = 1024  # the trainer's ServiceLimits.max_examples_per_request
ROLES = ("system", "user", "assistant")
UINT32_LIMIT = 2**32

FORMATS = """\
Line formats (JSON Lines: one JSON object per line; blank lines are skipped). Any line may carry an "id"
string, unique in the file: the trainer keeps it and refuses the same id a second time.

  chat (OpenAI fine-tuning, TRL conversational): roles system, user, assistant. Rendered with the served
  model's chat template; the loss is on every assistant turn, each of which must say something.
    {"messages": [{"role": "user", "content": "what is the color of the sky"},
                  {"role": "assistant", "content": "green house"}]}

  prompt/completion (TRL, OpenAI legacy): plain text, no chat template. The loss is on the completion
  and the tokenizer's end-of-sequence token after it (as TRL adds it). Prompt and completion are
  tokenized separately: start the completion with the space that separates it from the prompt.
    {"prompt": "the color of the sky is", "completion": " green house"}
  TRL's conversational form (message lists on both sides; no assistant turn in the prompt) is sent as chat:
    {"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "yes"}]}

  raw text with a mask: segments in order, tokenized separately; the loss is on those with "train": true.
  "add_eos": true (default false) appends the end-of-sequence token, trained if the last segment is.
    {"segments": [{"text": "Q: sky? A:", "train": false}, {"text": " green house", "train": true}]}
  A bare {"text": "..."} has no mask and is refused: {"segments": [{"text": "...", "train": true}]}
  trains on all of it.

  pre-tokenized: token ids of the served model's vocabulary and one 0/1 (or false/true) per id.
    {"input_ids": [9, 41, 17, 2], "loss_mask": [0, 0, 1, 1]}

Exit codes: 0 sent (and with --wait, trained), 1 the trainer failed or could not be reached, 2 bad input.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from weightshare import grpc_util

    parser.description = __doc__.split("\n\n", 2)[1]
    parser.epilog = FORMATS
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("file", metavar="FILE", help="JSONL file of examples, or - for stdin")
    parser.add_argument(
        "--trainer", default=grpc_util.default_socket_address("trainer"),
        help="TrainerService address of `weightshare train` (its --grpc; default: %(default)s)",
    )
    parser.add_argument(
        "--token", default=os.environ.get("WEIGHTSHARE_TOKEN"),
        help="bearer token of the trainer (its --token; default: $WEIGHTSHARE_TOKEN; none)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=64,
        help=f"examples per SubmitExamples call, 1 to {MAX_BATCH} (default: %(default)s)",
    )
    parser.add_argument(
        "--wait", action="store_true",
        help="after sending, follow the trainer's progress until every sent example is trained",
    )
    parser.add_argument(
        "--timeout", type=float, default=None, metavar="S",
        help="give up (exit 1) after S seconds of sending and, with --wait, waiting (default: no limit); "
        "examples already sent stay stored on the trainer",
    )
    parser.add_argument("--dry-run", action="store_true", help="validate the file only; send nothing")
    parser.add_argument(
        "--max-problems", type=int, default=100,
        help="report at most this many bad lines (0: all; default: %(default)s); every line is checked",
    )


# --- Parsing and validating lines, no server ---


class LineProblem(ValueError):
    """What is wrong with one line; the message names the key and the value."""


@dataclass
class ParsedFile:
    """The examples of a file, each with its line number, and the problems of its bad lines."""

    name: str
    examples: list[pb.Example] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    """File line (1-based) of each example."""
    kinds: collections.Counter = field(default_factory=collections.Counter)
    """Examples per line format: chat, prompt/completion, segments, tokens."""
    problems: list[tuple[int, str]] = field(default_factory=list)
    """(line, problem) of every bad line, in file order."""


def parse_jsonl(stream: BinaryIO | Iterable[bytes], name: str) -> ParsedFile:
    """Parses and validates every line of `stream` (bytes), collecting examples and problems."""
    parsed = ParsedFile(name)
    first_line_of_id: dict[str, int] = {}
    # Lines end at b"\n" only: JSON strings may hold U+2028 and other characters str.splitlines splits at.
    for number, raw in enumerate(stream, start=1):
        if number == 1:
            raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte order mark
        try:
            kind, example = parse_line(raw)
        except LineProblem as problem:
            parsed.problems.append((number, str(problem)))
            continue
        if example is None:
            continue  # blank
        if example.example_id:
            if example.example_id in first_line_of_id:
                first = first_line_of_id[example.example_id]
                parsed.problems.append((number, f"id {example.example_id!r} is also on line {first}: ids must be unique"))
                continue
            first_line_of_id[example.example_id] = number
        parsed.examples.append(example)
        parsed.lines.append(number)
        parsed.kinds[kind] += 1
    return parsed


def parse_line(raw: bytes) -> tuple[str, pb.Example | None]:
    """(format, example) of one line, or ("blank", None) for a blank one; raises LineProblem."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise LineProblem(f"not UTF-8 text: byte {err.start + 1} is {raw[err.start:err.start + 1]!r}") from None
    if not text.strip():
        return "blank", None
    try:
        record = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as err:
        raise LineProblem(f"invalid JSON: {err.msg} (column {err.colno})") from None
    return parse_record(record)


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    record = {}
    for key, value in pairs:
        if key in record:
            raise LineProblem(f"key {key!r} appears twice in one object")
        record[key] = value
    return record


FORMAT_KEYS = {
    "chat": ("messages",),
    "prompt/completion": ("prompt", "completion"),
    "segments": ("segments", "add_eos"),
    "tokens": ("input_ids", "loss_mask"),
}


def parse_record(record: object) -> tuple[str, pb.Example]:
    """(format, example) of one parsed JSON line; raises LineProblem."""
    if not isinstance(record, dict):
        raise LineProblem(f"a line must be a JSON object, not {_json_type(record)}")
    if "messages" in record:
        kind = "chat"
    elif "prompt" in record or "completion" in record:
        kind = "prompt/completion"
    elif "segments" in record:
        kind = "segments"
    elif "input_ids" in record or "loss_mask" in record:
        kind = "tokens"
    elif "text" in record:
        raise LineProblem(
            'a {"text": ...} line has no loss mask: write {"segments": [{"text": ..., "train": true}]} to train '
            "on all of it, or split it into segments with \"train\": false for the parts not to learn"
        )
    else:
        keys = ", ".join(repr(k) for k in record) or "none"
        raise LineProblem(
            f"not a known format (keys: {keys}): expected \"messages\", \"prompt\" + \"completion\", \"segments\" "
            "or \"input_ids\" + \"loss_mask\" (see weightshare submit --help)"
        )
    allowed = (*FORMAT_KEYS[kind], "id")
    for key in record:
        if key not in allowed:
            raise LineProblem(f"unknown key {key!r} in a {kind} line (accepted: {', '.join(allowed)})")
    example_id = record.get("id", "")
    if not isinstance(example_id, str) or ("id" in record and not example_id):
        raise LineProblem(f"id = {_show(example_id)} must be a non-empty string")
    example = pb.Example(example_id=example_id)
    if kind == "chat":
        example.chat.CopyFrom(_chat(record["messages"], "messages"))
    elif kind == "prompt/completion":
        kind = _prompt_completion(record, example)
    elif kind == "segments":
        example.text.CopyFrom(_segments(record))
    else:
        example.tokens.CopyFrom(_tokens(record))
    return kind, example


def _messages(messages: object, path: str) -> list[pb.ChatMessage]:
    if not isinstance(messages, list):
        raise LineProblem(f"{path} must be a list of messages, not {_json_type(messages)}")
    if not messages:
        raise LineProblem(f"{path} is empty")
    result = []
    for i, message in enumerate(messages):
        where = f"{path}[{i}]"
        if not isinstance(message, dict):
            raise LineProblem(f"{where} must be an object with role and content, not {_json_type(message)}")
        for key in message:
            if key == "weight":  # OpenAI's per-turn switch: 1 trains the turn (always so here), 0 does not
                if message[key] == 1 and not isinstance(message[key], bool):
                    continue
                raise LineProblem(
                    f"{where}.weight = {_show(message[key])} is not supported: every assistant turn is trained "
                    "(weight 1); drop the turn, or use prompt/completion or segments for finer control"
                )
            if key not in ("role", "content"):
                raise LineProblem(f"{where} has key {key!r}, which is not supported (role, content)")
        for key in ("role", "content"):
            if key not in message:
                raise LineProblem(f"{where} has no {key}")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise LineProblem(f"{where}.role = {_show(role)} is not one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise LineProblem(f"{where}.content must be a string, not {_json_type(content)}")
        if role == "assistant" and not content.strip():
            raise LineProblem(f"{where}.content is empty: an assistant turn must say what to learn")
        result.append(pb.ChatMessage(role=role, content=content))
    return result


def _chat(messages: object, path: str) -> pb.ChatExample:
    chat = pb.ChatExample(messages=_messages(messages, path))
    if not any(m.role == "assistant" for m in chat.messages):
        raise LineProblem(f"{path} has no assistant turn: nothing to train on")
    return chat


def _prompt_completion(record: dict, example: pb.Example) -> str:
    for key in ("prompt", "completion"):
        if key not in record:
            raise LineProblem(f"a prompt/completion line needs both keys: {key!r} is missing")
    prompt, completion = record["prompt"], record["completion"]
    if isinstance(prompt, str) and isinstance(completion, str):
        if not completion.strip():
            raise LineProblem("completion is empty: it is what the model learns")
        segments = [pb.TextSegment(text=prompt, train=False)] if prompt else []
        segments.append(pb.TextSegment(text=completion, train=True))
        example.text.CopyFrom(pb.TextExample(segments=segments, add_eos=True))
        return "prompt/completion"
    if isinstance(prompt, list) and isinstance(completion, list):  # TRL's conversational prompt-completion
        asked, answered = _messages(prompt, "prompt"), _messages(completion, "completion")
        for i, message in enumerate(asked):
            if message.role == "assistant":
                raise LineProblem(
                    f"prompt[{i}] is an assistant turn: chat examples train every assistant turn, so a "
                    "conversational prompt may hold only system and user turns (use \"messages\" to train them all)"
                )
        for i, message in enumerate(answered):
            if message.role != "assistant":
                raise LineProblem(f"completion[{i}].role = {message.role!r}: a completion holds assistant turns only")
        example.chat.CopyFrom(pb.ChatExample(messages=[*asked, *answered]))
        return "chat"
    raise LineProblem(
        f"prompt ({_json_type(prompt)}) and completion ({_json_type(completion)}) must both be strings, or both "
        "lists of messages"
    )


def _segments(record: dict) -> pb.TextExample:
    segments = record["segments"]
    if not isinstance(segments, list):
        raise LineProblem(f"segments must be a list of {{\"text\", \"train\"}} objects, not {_json_type(segments)}")
    if not segments:
        raise LineProblem("segments is empty")
    result = pb.TextExample()
    for j, segment in enumerate(segments):
        where = f"segments[{j}]"
        if not isinstance(segment, dict):
            raise LineProblem(f"{where} must be an object with text and train, not {_json_type(segment)}")
        for key in segment:
            if key not in ("text", "train"):
                raise LineProblem(f"{where} has key {key!r}, which is not supported (text, train)")
        for key in ("text", "train"):
            if key not in segment:
                raise LineProblem(f"{where} has no {key}")
        text, train = segment["text"], segment["train"]
        if not isinstance(text, str):
            raise LineProblem(f"{where}.text must be a string, not {_json_type(text)}")
        if not text:
            raise LineProblem(f"{where}.text is empty: drop the segment")
        if not isinstance(train, bool):
            raise LineProblem(f"{where}.train = {_show(train)} must be true or false")
        result.segments.append(pb.TextSegment(text=text, train=train))
    if not any(s.train for s in result.segments):
        raise LineProblem("segments has no segment with \"train\": true: nothing to train on")
    add_eos = record.get("add_eos", False)
    if not isinstance(add_eos, bool):
        raise LineProblem(f"add_eos = {_show(add_eos)} must be true or false")
    result.add_eos = add_eos
    return result


def _tokens(record: dict) -> pb.TokenExample:
    for key in ("input_ids", "loss_mask"):
        if key not in record:
            raise LineProblem(f"a tokens line needs input_ids and loss_mask: {key!r} is missing")
    ids, mask = record["input_ids"], record["loss_mask"]
    for key, value in (("input_ids", ids), ("loss_mask", mask)):
        if not isinstance(value, list):
            raise LineProblem(f"{key} must be a list, not {_json_type(value)}")
    if not ids:
        raise LineProblem("input_ids is empty")
    if len(mask) != len(ids):
        raise LineProblem(f"loss_mask has {len(mask)} entries but input_ids has {len(ids)}: same length needed")
    for i, token in enumerate(ids):
        if not isinstance(token, int) or isinstance(token, bool) or not 0 <= token < UINT32_LIMIT:
            raise LineProblem(f"input_ids[{i}] = {_show(token)} is not a token id (an integer from 0)")
    for i, flag in enumerate(mask):
        if flag not in (0, 1) or not isinstance(flag, int):  # bools are ints; 0.0 and 1.0 are not accepted
            raise LineProblem(f"loss_mask[{i}] = {_show(flag)} must be 0, 1, false or true")
    if not any(mask[1:]):
        raise LineProblem("no training target: loss_mask is 0 everywhere past the first token (which nothing "
                          "precedes to predict it from)")
    return pb.TokenExample(input_ids=ids, loss_mask=[bool(m) for m in mask])


def _json_type(value: object) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _show(value: object) -> str:
    shown = json.dumps(value, ensure_ascii=False)
    return shown if len(shown) <= 60 else shown[:57] + "..."


# --- Sending and waiting ---


class SubmitFailed(Exception):
    """The command cannot go on; the message says what happened and what to do. `code`: the exit code."""

    def __init__(self, message: str, code: int = 1, **fields):
        super().__init__(message)
        self.code = code
        self.fields = fields


@dataclass
class Outcome:
    """What a run did, for the summary line."""

    sent: int = 0
    sent_lines: list[int] = field(default_factory=list)
    pending_after_last: int = 0


class Client:
    """TrainerService calls with the token, and gRPC errors turned into one line with the fix."""

    def __init__(self, address: str, token: str | None):
        from weightshare import grpc_util
        from weightshare.v1 import trainer_service_pb2_grpc as pb_grpc

        self.address = grpc_util.validate_address(address)
        self.channel = grpc_util.open_sync_channel(address)
        self.stub = pb_grpc.TrainerServiceStub(self.channel)
        self.metadata = grpc_util.call_metadata(token)

    def status(self, timeout_s: float = 30.0) -> pb.GetTrainingStatusResponse:
        return self.stub.GetTrainingStatus(pb.GetTrainingStatusRequest(), timeout=timeout_s, metadata=self.metadata)

    def submit(self, examples: list[pb.Example], timeout_s: float) -> pb.SubmitExamplesResponse:
        return self.stub.SubmitExamples(pb.SubmitExamplesRequest(examples=examples), timeout=timeout_s,
                                        metadata=self.metadata)

    def progress(self):
        return self.stub.StreamProgress(pb.StreamProgressRequest(), metadata=self.metadata)

    def problem(self, err, doing: str) -> SubmitFailed:
        """One line for an RpcError of `doing` (e.g. "asking for its status"), with the fix."""
        import grpc

        code, details = err.code(), err.details() or ""
        if code == grpc.StatusCode.UNAVAILABLE:
            return SubmitFailed(
                f"no trainer answers at {self.address} ({details}): start `weightshare train` (its --grpc address "
                "is where examples go), or pass --trainer ADDRESS", doing=doing)
        if code == grpc.StatusCode.UNAUTHENTICATED:
            return SubmitFailed(
                f"the trainer at {self.address} refused the token ({details}): pass --token TOKEN (or set "
                "WEIGHTSHARE_TOKEN) with the trainer's --token", doing=doing)
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return SubmitFailed(f"the trainer at {self.address} did not answer in time while {doing}: it may be "
                                "overloaded; try again, or with a smaller --batch-size", doing=doing)
        return SubmitFailed(f"the trainer at {self.address} failed while {doing}: {code.name}: {details}",
                            doing=doing)

    def close(self) -> None:
        self.channel.close()


class Deadline:
    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self._end = None if seconds is None else time.monotonic() + seconds

    def left(self, cap: float) -> float:
        """Seconds a call may take: what is left of --timeout, at most `cap`; raises when none is left."""
        if self._end is None:
            return cap
        left = self._end - time.monotonic()
        if left <= 0:
            raise TimeoutError
        return min(cap, left)

    @property
    def passed(self) -> bool:
        return self._end is not None and time.monotonic() >= self._end


SUBMIT_CALL_S = 600.0  # one batch: rendering 1024 long chats on a busy CPU takes a while
STATUS_CALL_S = 30.0
POLL_S = 2.0  # GetTrainingStatus at least this often while waiting, events or not
REFOLLOW_S = 10.0  # StreamProgress is opened again at most this often after it ended
QUEUE_FULL_RETRY_S = 0.5  # a batch refused for a full queue is sent again this often
_EXAMPLE_INDEX = re.compile(r"\bexamples\[(\d+)\]")
_EXAMPLE_ID = re.compile(r"example_id '((?:[^'\\]|\\.)*)'")
REFUSED_INPUT = ("INVALID_ARGUMENT", "FAILED_PRECONDITION", "ALREADY_EXISTS")


def send(client: Client, parsed: ParsedFile, batch_size: int, deadline: Deadline, report, terminal: bool) -> Outcome:
    """Sends `parsed.examples` in batches; raises SubmitFailed naming the file line of a refused example."""
    import grpc
    from tqdm import tqdm

    outcome = Outcome()
    total = len(parsed.examples)
    waiting_logged = False
    with tqdm(total=total, desc="sending", unit="example", file=sys.stderr, disable=not terminal,
              dynamic_ncols=True) as bar:
        for start in range(0, total, batch_size):
            batch = parsed.examples[start : start + batch_size]
            lines = parsed.lines[start : start + batch_size]
            while True:
                try:
                    reply = client.submit(batch, deadline.left(SUBMIT_CALL_S))
                    break
                except TimeoutError:
                    raise _timed_out(parsed, outcome, deadline) from None
                except grpc.RpcError as err:
                    details = err.details() or ""
                    if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_pending_examples" in details:
                        # Refused before anything was stored: wait for training to drain the queue, then retry.
                        if not waiting_logged:
                            log.warning("the trainer's queue is full; waiting for it to train some", detail=details)
                            waiting_logged = True
                        if deadline.passed:
                            raise _timed_out(parsed, outcome, deadline) from None
                        time.sleep(QUEUE_FULL_RETRY_S)
                        continue
                    raise _batch_refused(client, err, parsed, outcome, start, lines, report) from None
            outcome.sent += len(batch)
            outcome.sent_lines += lines
            outcome.pending_after_last = reply.pending_examples
            bar.update(len(batch))
            if not terminal:
                log.info("sent", examples=outcome.sent, of=total, lines=f"{lines[0]}-{lines[-1]}",
                         pending_on_trainer=reply.pending_examples)
    return outcome


def _accepted(outcome: Outcome, first_unsent: int | None) -> str:
    if not outcome.sent:
        return "nothing was stored"
    rest = f"; nothing from line {first_unsent} on was stored" if first_unsent else ""
    return (f"the {outcome.sent} examples of lines {outcome.sent_lines[0]}-{outcome.sent_lines[-1]} were accepted "
            f"and will be trained{rest}")


def _timed_out(parsed: ParsedFile, outcome: Outcome, deadline: Deadline) -> SubmitFailed:
    first_unsent = parsed.lines[outcome.sent] if outcome.sent < len(parsed.lines) else None
    return SubmitFailed(f"--timeout {deadline.seconds:g} s passed while sending: "
                        f"{_accepted(outcome, first_unsent)}")


def _batch_refused(client: Client, err, parsed: ParsedFile, outcome: Outcome, start: int, lines: list[int],
                   report) -> SubmitFailed:
    """The trainer refused a batch (all or none): name the file line of the example it names."""
    import grpc

    code, details = err.code(), err.details() or ""
    batch = f"lines {lines[0]}-{lines[-1]}" if len(lines) > 1 else f"line {lines[0]}"
    if code.name in REFUSED_INPUT:
        line = None
        if match := _EXAMPLE_INDEX.search(details):
            if int(match.group(1)) < len(lines):
                line = lines[int(match.group(1))]
                details = _EXAMPLE_INDEX.sub("example", details, count=1)
        elif match := _EXAMPLE_ID.search(details):
            for i, example in enumerate(parsed.examples[start : start + len(lines)]):
                if example.example_id == match.group(1):
                    line = lines[i]
                    break
        if line is not None:
            report(line, f"refused by the trainer: {details}")
            what = f"the trainer refused line {line} ({code.name}, above)"
        else:
            what = f"the trainer refused the batch of {batch} ({code.name}: {details})"
        if not outcome.sent:
            return SubmitFailed(f"{what}: nothing was stored; fix it and submit again", code=2)
        resume = (f"tail -n +{lines[0]} {parsed.name} | weightshare submit -" if parsed.name != STDIN_NAME
                  else f"the input from line {lines[0]} on")
        return SubmitFailed(f"{what}: {_accepted(outcome, lines[0])}; fix it, then submit the rest: {resume}", code=2)
    failure = client.problem(err, f"sending {batch}")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
        return SubmitFailed(f"{failure}. The batch of {batch} may or may not have been stored (see the trainer's "
                            f"GetTrainingStatus); before it, {_accepted(outcome, None)}")
    return SubmitFailed(f"{failure}; {_accepted(outcome, lines[0])}")


_STREAM_ENDED = object()


class _ProgressFollower:
    """Reads StreamProgress on a thread into a queue; the stream's end puts _STREAM_ENDED (or its error)."""

    def __init__(self, client: Client):
        self.events: queue.Queue = queue.Queue()
        self.started = time.monotonic()
        self._call = client.progress()
        self._thread = threading.Thread(target=self._read, daemon=True, name="progress")
        self._thread.start()

    def _read(self) -> None:
        import grpc

        try:
            for event in self._call:
                self.events.put(event)
            self.events.put(_STREAM_ENDED)
        except grpc.RpcError as err:
            self.events.put(err)

    def next(self, timeout_s: float):
        """The next event, _STREAM_ENDED, an RpcError, or None when `timeout_s` passes without one."""
        try:
            return self.events.get(timeout=timeout_s)
        except queue.Empty:
            return None

    def cancel(self) -> None:
        self._call.cancel()
        self._thread.join(5)


def wait_until_trained(client: Client, sent: int, pending_after_last: int, deadline: Deadline,
                       terminal: bool) -> pb.GetTrainingStatusResponse:
    """Blocks until the trainer has trained every example this run stored; returns the final status.

    Examples are trained in the order they were stored, and `trained_examples` (the trainer's cursor) counts
    them. The last batch's reply says how many were pending right after it was stored: those and everything
    before them are trained once the cursor reaches T, the number stored at that moment. The client does
    not see T, only bounds: with the first status read after the reply, T <= trained + pending (examples are
    only added) and T <= trained + pending_after_last (the cursor only grows), so the target is trained +
    min(pending, pending_after_last): exact when nobody else submitted meanwhile, otherwise an upper bound
    (waiting a little longer, never too little). `pending_examples == 0` in any later status also means
    done, whatever the bound (the two fields are read one after the other, so their sum may overshoot by a
    step). StreamProgress events wake the wait at once; the status is polled every POLL_S seconds anyway,
    and through a trainer restart (the examples are stored; a restarted trainer trains them).
    """
    import grpc
    from tqdm import tqdm

    def timed_out(mine: int) -> SubmitFailed:
        return SubmitFailed(f"--timeout {deadline.seconds:g} s passed: {mine} of the {sent} examples sent are "
                            "trained; all are stored on the trainer and will be trained", trained=mine, sent=sent)

    # Subscribed before the status read, so that no step between the two goes unseen.
    follower: _ProgressFollower | None = _ProgressFollower(client)
    try:
        status = client.status(deadline.left(STATUS_CALL_S))
    except TimeoutError:
        follower.cancel()
        raise timed_out(0) from None
    except grpc.RpcError as err:
        follower.cancel()
        raise client.problem(err, "asking for its status") from None
    target = status.trained_examples + min(status.pending_examples, pending_after_last)
    followed_at = follower.started
    warned: set[str] = set()
    unreachable = False
    mine, logged = 0, -1
    bar = tqdm(total=sent, desc="training", unit="example", file=sys.stderr, disable=not terminal,
               dynamic_ncols=True)
    try:
        while True:
            done = status.trained_examples >= target or status.pending_examples == 0
            mine = sent if done else max(0, min(sent, status.trained_examples - (target - sent)))
            ahead = max(0, target - sent - status.trained_examples)
            bar.set_postfix_str(f"step {status.step} loss {status.last_loss:.4f} v{status.weights_version}"
                                + (f", {ahead} queued ahead" if ahead else ""), refresh=False)
            bar.update(mine - bar.n)
            bar.refresh()
            if not terminal and mine != logged:
                log.info("training", trained=mine, of=sent, queued_ahead=ahead, step=status.step,
                         loss=round(status.last_loss, 4), weights_version=status.weights_version)
                logged = mine
            if done:
                return status
            _warn_once(status, warned)
            try:
                if follower is None:
                    time.sleep(deadline.left(POLL_S))
                    item = None
                else:
                    item = follower.next(deadline.left(POLL_S))
            except TimeoutError:
                raise timed_out(mine) from None
            if item is _STREAM_ENDED or isinstance(item, grpc.RpcError):
                follower = None  # the trainer stopped or restarted: poll, and follow again once it answers
            elif isinstance(item, pb.StreamProgressResponse) and item.kind == pb.PROGRESS_KIND_SKIPPED:
                log.warning("the trainer skipped a step", step=item.step + 1, why=item.message)
            elif isinstance(item, pb.StreamProgressResponse) and item.kind == pb.PROGRESS_KIND_STOPPED:
                log.warning("the trainer's training loop stopped", why=item.message)
            try:
                status = client.status(deadline.left(STATUS_CALL_S))
            except TimeoutError:
                raise timed_out(mine) from None
            except grpc.RpcError as err:
                if err.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise client.problem(err, "asking for its status") from None
                if not unreachable:
                    log.warning("the trainer does not answer; still waiting: the examples are stored and a "
                                "restarted trainer trains them", address=client.address, detail=err.details())
                    unreachable = True
                continue
            if unreachable:
                log.info("the trainer answers again", address=client.address)
                unreachable = False
            if follower is None and time.monotonic() - followed_at > REFOLLOW_S:
                follower = _ProgressFollower(client)  # a stream that keeps failing is retried this seldom
                followed_at = follower.started
    finally:
        bar.close()
        if follower is not None:
            follower.cancel()


def _warn_once(status: pb.GetTrainingStatusResponse, warned: set[str]) -> None:
    """Says once (again after a change) why nothing may train: the loop is off, or vLLM is away."""
    if not status.running and status.pending_examples:
        if "stopped" not in warned:
            why = f" (last error: {status.last_error})" if status.last_error else ""
            log.warning(f"the trainer's training loop is not running{why}: the examples wait until it is started "
                        "(StartTraining, or `weightshare train` without --no-autostart)")
            warned.add("stopped")
    else:
        warned.discard("stopped")
    if not status.inference_connected and status.inference_problem:
        if "inference" not in warned:
            log.warning("the trainer cannot train now", why=status.inference_problem)
            warned.add("inference")
    else:
        warned.discard("inference")


def run(args: argparse.Namespace) -> int:
    from weightshare.logs import configure_logging

    configure_logging()
    terminal = sys.stderr.isatty()
    if not 1 <= args.batch_size <= MAX_BATCH:
        raise UsageError(f"--batch-size {args.batch_size} must be from 1 to {MAX_BATCH} (the trainer's limit)")
    if args.timeout is not None and args.timeout <= 0:
        raise UsageError(f"--timeout {args.timeout:g} must be positive")
    name = STDIN_NAME if args.file == "-" else args.file
    if args.file == "-":
        parsed = parse_jsonl(sys.stdin.buffer, name)
    else:
        try:
            with open(args.file, "rb") as f:
                parsed = parse_jsonl(f, name)
        except OSError as err:
            raise UsageError(f"cannot read {args.file}: {err.strerror}") from None

    printed = 0

    def report(line: int, problem: str) -> None:
        nonlocal printed
        printed += 1
        text = f"{name}:{line}: {problem}"
        if terminal:
            print(text, file=sys.stderr)
        else:
            log.error(text, file=name, line=line)

    if parsed.problems:
        limit = args.max_problems or len(parsed.problems)
        for line, problem in parsed.problems[:limit]:
            report(line, problem)
        more = f" ({len(parsed.problems) - limit} more not shown; --max-problems 0 shows all)" \
            if len(parsed.problems) > limit else ""
        log.error(f"{len(parsed.problems)} bad lines in {name}{more}: nothing was sent; fix them and submit again",
                  bad_lines=len(parsed.problems), examples=len(parsed.examples))
        return 2
    if not parsed.examples:
        log.error(f"{name} holds no examples: nothing to send")
        return 2
    kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(parsed.kinds.items()))
    if args.dry_run:
        print(f"{name}: {len(parsed.examples)} valid examples ({kinds}); nothing sent (--dry-run)")
        return 0

    client = Client(args.trainer, args.token)
    deadline = Deadline(args.timeout)
    import grpc

    phase = "connecting"
    outcome = Outcome()
    try:
        try:
            before = client.status(deadline.left(STATUS_CALL_S))
        except grpc.RpcError as err:
            raise client.problem(err, "asking for its status") from None
        except TimeoutError:
            raise SubmitFailed(f"--timeout {args.timeout:g} s passed before the trainer answered") from None
        phase = "sending"
        log.info("sending", examples=len(parsed.examples), formats=kinds, trainer=client.address,
                 batch_size=args.batch_size)
        outcome = send(client, parsed, args.batch_size, deadline, report, terminal)
        if not args.wait:
            print(f"sent {outcome.sent} examples from {name} to {client.address}; "
                  f"{outcome.pending_after_last} pending on the trainer")
            return 0
        phase = "waiting"
        s = wait_until_trained(client, outcome.sent, outcome.pending_after_last, deadline, terminal)
        # A trainer that restored an older checkpoint meanwhile counts from there again.
        steps, skipped = max(0, s.step - before.step), max(0, s.skipped_steps - before.skipped_steps)
        print(f"sent {outcome.sent} examples from {name}; trained {outcome.sent} of {outcome.sent} in {steps} steps "
              f"({skipped} skipped); step {s.step}, last loss {s.last_loss:.4f}, weights version {s.weights_version}")
        return 0
    except SubmitFailed as failure:
        log.error(str(failure), **failure.fields)
        return failure.code
    except KeyboardInterrupt:
        if phase == "waiting":
            log.error(f"interrupted while waiting: the {outcome.sent} examples sent are stored on the trainer and "
                      "will be trained")
        elif phase == "sending":
            log.error(f"interrupted while sending: {_accepted(outcome, None)}; the batch in flight may or "
                      "may not have been stored")
        else:
            log.error("interrupted: nothing was sent")
        return 130
    finally:
        client.close()
