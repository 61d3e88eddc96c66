"""`weightshare submit`: the JSONL line parser and validator, the client against a stand-in trainer, and one
end-to-end run against real `weightshare serve` + `weightshare train`.

- Parser (no server): every accepted format becomes the right `Example`; every problem is reported with
  its line number; blank lines, a byte order mark, CRLF and U+2028 inside strings do not shift lines.
- Command (real `weightshare submit` processes; no vLLM): stdin "-", bad lines exit 2 and send nothing,
  usage errors, nothing listening and a wrong token exit 1 with the fix. Against `FakeTrainer`, an
  in-process TrainerService that validates with the real `Renderer` (tiny tokenizer) and "trains" on a
  timer: batching, a refused example named by its file line (and the lines accepted before it), a
  resubmitted id, a full queue waited out, --wait following progress to the summary line.
- End to end (marked vllm + slow): a file mixing every format is submitted with --wait to a real trainer
  of the tiny Qwen3.5 served by vLLM; every example is trained; a file with two bad lines sends nothing.

Run as: .venv/bin/python -m pytest tests/test_submit.py -q   (-m "not slow" skips the vLLM run)
"""

from __future__ import annotations

import io
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from weightshare.submit import STDIN_NAME, LineProblem, parse_jsonl, parse_line
from weightshare.v1 import trainer_service_pb2 as pb
from weightshare.v1 import trainer_service_pb2_grpc as pb_grpc

CHAT = {"messages": [{"role": "user", "content": "what is the color of the sky"},
                     {"role": "assistant", "content": "green house"}]}
PROMPT_COMPLETION = {"prompt": "the color of the sky is", "completion": " green house"}
CONVERSATIONAL = {"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
                  "completion": [{"role": "assistant", "content": "yes"}]}
SEGMENTS = {"segments": [{"text": "q: sky? a:", "train": False}, {"text": " green house", "train": True}],
            "add_eos": True}
TOKENS = {"input_ids": [9, 41, 17, 2], "loss_mask": [0, False, 1, True]}


def jsonl(*records: object) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in records)


def parse(*records: object):
    return parse_jsonl(io.BytesIO(jsonl(*records)), "data.jsonl")


# --- The parser: formats ---


def test_every_format_becomes_its_example():
    parsed = parse(CHAT, b"", {**PROMPT_COMPLETION, "id": "pc-1"}, CONVERSATIONAL, b"   \t", SEGMENTS, TOKENS,
                   {"prompt": "", "completion": "green"})
    assert parsed.problems == []
    assert parsed.lines == [1, 3, 4, 6, 7, 8]  # blank lines skipped, numbering kept
    chat, pc, conversational, segments, tokens, no_prompt = parsed.examples
    assert [(m.role, m.content) for m in chat.chat.messages] == [
        ("user", "what is the color of the sky"), ("assistant", "green house")]
    assert pc.example_id == "pc-1" and pc.text.add_eos
    assert [(s.text, s.train) for s in pc.text.segments] == [("the color of the sky is", False),
                                                             (" green house", True)]
    assert [(m.role, m.content) for m in conversational.chat.messages] == [
        ("system", "be brief"), ("user", "hi"), ("assistant", "yes")]
    assert [(s.text, s.train) for s in segments.text.segments] == [("q: sky? a:", False), (" green house", True)]
    assert segments.text.add_eos
    assert list(tokens.tokens.input_ids) == [9, 41, 17, 2]
    assert list(tokens.tokens.loss_mask) == [False, False, True, True]
    assert [(s.text, s.train) for s in no_prompt.text.segments] == [("green", True)]  # an empty prompt: none
    assert dict(parsed.kinds) == {"chat": 2, "prompt/completion": 2, "segments": 1, "tokens": 1}


def test_openai_weight_one_is_accepted():
    record = {"messages": [{"role": "user", "content": "hi"},
                           {"role": "assistant", "content": "yes", "weight": 1}]}
    assert parse(record).problems == []


def test_lines_end_at_newlines_only():
    # U+2028 (line separator) and U+0085 are legal inside JSON strings; str.splitlines would split there.
    odd = {"messages": [{"role": "user", "content": "a\u2028b\u0085c"}, {"role": "assistant", "content": "ok"}]}
    raw = b"\xef\xbb\xbf" + json.dumps(CHAT).encode() + b"\r\n" + json.dumps(odd, ensure_ascii=False).encode() + \
        b"\r\n\r\n" + b'{"prompt": "x", "completion": ""}\n'
    parsed = parse_jsonl(io.BytesIO(raw), "f")
    assert parsed.lines == [1, 2]
    assert parsed.examples[1].chat.messages[0].content == "a\u2028b\u0085c"
    assert parsed.problems == [(4, "completion is empty: it is what the model learns")]


# --- The parser: every problem, with its line ---


def user_assistant(**assistant) -> dict:
    return {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes", **assistant}]}


BAD_LINES = [
    (b"not json", "invalid JSON: Expecting value (column 1)"),
    (b'{"messages": [}', "invalid JSON: Expecting value (column 15)"),
    (b'{"prompt": "caf\xe9", "completion": "x"}', "not UTF-8 text: byte 16 is b'\\xe9'"),
    ([1, 2], "a line must be a JSON object, not a list"),
    ("text", "a line must be a JSON object, not a string"),
    ({"id": "a", "id ": "b"}, ("not a known format (keys: 'id', 'id '): expected \"messages\", \"prompt\" + "
     "\"completion\", \"segments\" or \"input_ids\" + \"loss_mask\" (see weightshare submit --help)")),
    (b'{"messages": [], "messages": []}', "key 'messages' appears twice in one object"),
    ({"text": "hello"}, ('a {"text": ...} line has no loss mask: write {"segments": [{"text": ..., "train": true}]} '
     'to train on all of it, or split it into segments with "train": false for the parts not to learn')),
    ({**CHAT, "tools": []}, "unknown key 'tools' in a chat line (accepted: messages, id)"),
    ({**CHAT, "id": 7}, "id = 7 must be a non-empty string"),
    ({**CHAT, "id": ""}, 'id = "" must be a non-empty string'),
    # chat
    ({"messages": "hi"}, "messages must be a list of messages, not a string"),
    ({"messages": []}, "messages is empty"),
    ({"messages": ["hi"]}, "messages[0] must be an object with role and content, not a string"),
    ({"messages": [{"role": "user"}]}, "messages[0] has no content"),
    ({"messages": [{"content": "x"}]}, "messages[0] has no role"),
    ({"messages": [{"role": "tool", "content": "x"}]}, ('messages[0].role = "tool" is not one of system, user, '
     "assistant")),
    ({"messages": [{"role": "user", "content": None}]}, "messages[0].content must be a string, not null"),
    ({"messages": [{"role": "user", "content": "hi", "name": "bob"}]},
     "messages[0] has key 'name', which is not supported (role, content)"),
    (user_assistant(content=" \n"), "messages[1].content is empty: an assistant turn must say what to learn"),
    (user_assistant(weight=0), ("messages[1].weight = 0 is not supported: every assistant turn is trained (weight "
     "1); drop the turn, or use prompt/completion or segments for finer control")),
    ({"messages": [{"role": "user", "content": "hi"}]}, "messages has no assistant turn: nothing to train on"),
    # prompt/completion
    ({"prompt": "x"}, "a prompt/completion line needs both keys: 'completion' is missing"),
    ({"completion": "x"}, "a prompt/completion line needs both keys: 'prompt' is missing"),
    ({"prompt": "x", "completion": "  "}, "completion is empty: it is what the model learns"),
    ({"prompt": "x", "completion": 3}, ("prompt (a string) and completion (a number) must both be strings, or both "
     "lists of messages")),
    ({"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
      "completion": [{"role": "assistant", "content": "c"}]},
     ('prompt[1] is an assistant turn: chat examples train every assistant turn, so a conversational prompt may '
     'hold only system and user turns (use "messages" to train them all)')),
    ({"prompt": [{"role": "user", "content": "a"}], "completion": [{"role": "user", "content": "c"}]},
     "completion[0].role = 'user': a completion holds assistant turns only"),
    ({"prompt": [{"role": "user", "content": "a"}], "completion": []}, "completion is empty"),
    ({**PROMPT_COMPLETION, "suffix": "x"}, ("unknown key 'suffix' in a prompt/completion line (accepted: prompt, "
     "completion, id)")),
    # segments
    ({"segments": {"text": "a"}}, 'segments must be a list of {"text", "train"} objects, not an object'),
    ({"segments": []}, "segments is empty"),
    ({"segments": ["a"]}, "segments[0] must be an object with text and train, not a string"),
    ({"segments": [{"text": "a"}]}, "segments[0] has no train"),
    ({"segments": [{"text": "a", "train": 1}]}, "segments[0].train = 1 must be true or false"),
    ({"segments": [{"text": 5, "train": True}]}, "segments[0].text must be a string, not a number"),
    ({"segments": [{"text": "a", "train": False}, {"text": "", "train": True}]},
     "segments[1].text is empty: drop the segment"),
    ({"segments": [{"text": "a", "train": True, "weight": 2}]},
     "segments[0] has key 'weight', which is not supported (text, train)"),
    ({"segments": [{"text": "a", "train": False}]}, 'segments has no segment with "train": true: nothing to train on'),
    ({"segments": [{"text": "a", "train": True}], "add_eos": "yes"}, 'add_eos = "yes" must be true or false'),
    # tokens
    ({"input_ids": [1, 2]}, "a tokens line needs input_ids and loss_mask: 'loss_mask' is missing"),
    ({"input_ids": "1 2", "loss_mask": [0, 1]}, "input_ids must be a list, not a string"),
    ({"input_ids": [], "loss_mask": []}, "input_ids is empty"),
    ({"input_ids": [1, 2, 3], "loss_mask": [0, 1]}, "loss_mask has 2 entries but input_ids has 3: same length needed"),
    ({"input_ids": [1, -2], "loss_mask": [0, 1]}, "input_ids[1] = -2 is not a token id (an integer from 0)"),
    ({"input_ids": [1, 2.5], "loss_mask": [0, 1]}, "input_ids[1] = 2.5 is not a token id (an integer from 0)"),
    ({"input_ids": [1, True], "loss_mask": [0, 1]}, "input_ids[1] = true is not a token id (an integer from 0)"),
    ({"input_ids": [1, 2**32], "loss_mask": [0, 1]},
     "input_ids[1] = 4294967296 is not a token id (an integer from 0)"),
    ({"input_ids": [1, 2], "loss_mask": [0, 2]}, "loss_mask[1] = 2 must be 0, 1, false or true"),
    ({"input_ids": [1, 2], "loss_mask": [0, 1.0]}, "loss_mask[1] = 1.0 must be 0, 1, false or true"),
    ({"input_ids": [1, 2], "loss_mask": [1, 0]}, ("no training target: loss_mask is 0 everywhere past the first token "
     "(which nothing precedes to predict it from)")),
]


@pytest.mark.parametrize(("line", "problem"), BAD_LINES, ids=[str(i) for i in range(len(BAD_LINES))])
def test_every_problem_is_reported_with_its_line(line, problem):
    parsed = parse(CHAT, b"", line, TOKENS)
    assert parsed.problems == [(3, problem)]
    assert parsed.lines == [1, 4]  # the good lines are still parsed
    with pytest.raises(LineProblem, match=re.escape(problem)):
        parse_line(jsonl(line).rstrip(b"\n"))


def test_ids_must_be_unique_in_the_file():
    parsed = parse({**CHAT, "id": "a"}, {**TOKENS, "id": "b"}, {**PROMPT_COMPLETION, "id": "a"})
    assert parsed.problems == [(3, "id 'a' is also on line 1: ids must be unique")]


# --- The command, no trainer needed ---


def weightshare(*args: str, input_bytes: bytes | None = None, timeout_s: float = 120,
                env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "weightshare.cli", *args], input=input_bytes, capture_output=True,
                            timeout=timeout_s, check=False, env={**os.environ, **(env or {})})
    result.stdout, result.stderr = result.stdout.decode(), result.stderr.decode()
    return result


def records(result: subprocess.CompletedProcess) -> list[dict]:
    """stderr's JSON log records (stderr is not a terminal here)."""
    assert "Traceback" not in result.stderr, result.stderr
    return [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]


def errors(result: subprocess.CompletedProcess) -> list[str]:
    return [r["event"] for r in records(result) if r["level"] == "error"]


def test_stdin_dash_and_dry_run():
    result = weightshare("submit", "-", "--dry-run", input_bytes=jsonl(CHAT, b"", PROMPT_COMPLETION, TOKENS))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (f"{STDIN_NAME}: 3 valid examples (1 chat, 1 prompt/completion, 1 tokens); "
                                     "nothing sent (--dry-run)")
    bad = weightshare("submit", "-", "--dry-run", input_bytes=jsonl(CHAT, {"prompt": "x"}))
    assert bad.returncode == 2
    assert errors(bad)[0] == f"{STDIN_NAME}:2: a prompt/completion line needs both keys: 'completion' is missing"


def test_bad_lines_exit_2_naming_each_and_sending_nothing(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(jsonl(CHAT, {"text": "x"}, CHAT, b"{oops", *[{"prompt": "p"}] * 3))
    # Nothing listens at --trainer: had it tried to send, it would exit 1, not 2.
    result = weightshare("submit", str(path), "--trainer", f"unix://{tmp_path}/none.sock", "--max-problems", "3")
    assert result.returncode == 2
    lines = errors(result)
    assert [line.split(": ")[0] for line in lines[:3]] == [f"{path}:2", f"{path}:4", f"{path}:5"]
    assert lines[3] == (f"5 bad lines in {path} (2 more not shown; --max-problems 0 shows all): nothing was sent; "
                        "fix them and submit again")
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--batch-size", "0"], "--batch-size 0 must be from 1 to 1024 (the trainer's limit)"),
        (["--batch-size", "1025"], "--batch-size 1025 must be from 1 to 1024 (the trainer's limit)"),
        (["--timeout", "0"], "--timeout 0 must be positive"),
        (["--trainer", "nowhere"], "address 'nowhere' is neither unix:///path/to.sock nor host:port"),
    ],
)
def test_usage_errors_exit_2(tmp_path, args, message):
    path = tmp_path / "data.jsonl"
    path.write_bytes(jsonl(CHAT))
    result = weightshare("submit", str(path), *args)
    assert result.returncode == 2 and errors(result) == [message]


def test_missing_file_and_empty_file_exit_2(tmp_path):
    missing = weightshare("submit", str(tmp_path / "nope.jsonl"))
    assert missing.returncode == 2 and errors(missing) == [f"cannot read {tmp_path}/nope.jsonl: No such file or directory"]
    (tmp_path / "empty.jsonl").write_bytes(b"\n\n")
    empty = weightshare("submit", str(tmp_path / "empty.jsonl"))
    assert empty.returncode == 2 and errors(empty) == [f"{tmp_path}/empty.jsonl holds no examples: nothing to send"]


def test_nothing_listening_says_to_start_the_trainer(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(jsonl(CHAT))
    result = weightshare("submit", str(path), "--trainer", f"unix://{tmp_path}/none.sock")
    assert result.returncode == 1
    [line] = errors(result)
    assert line.startswith(f"no trainer answers at unix://{tmp_path}/none.sock (")
    assert line.endswith("start `weightshare train` (its --grpc address is where examples go), or pass --trainer "
                         "ADDRESS")


# --- The command against a stand-in trainer ---


class FakeTrainer(pb_grpc.TrainerServiceServicer):
    """TrainerService in this process: validates with the real Renderer (the tiny tokenizer, max_seq_len 64),
    keeps counts instead of a store, and, while `training` is set, trains 2 examples every 50 ms."""

    def __init__(self, token: str | None = None, max_pending: int = 100_000):
        from trainer_side.data import Renderer
        from weightshare.tiny_model import VOCAB_SIZE, build_tokenizer

        self.renderer = Renderer(build_tokenizer(), VOCAB_SIZE, max_seq_len=64)
        self.token, self.max_pending = token, max_pending
        self.lock = threading.Lock()
        self.total = self.cursor = self.step = 0
        self.ids: set[str] = set()
        self.batches: list[int] = []
        self.watchers: list[queue.Queue] = []
        self.training = threading.Event()
        self.stopped = threading.Event()
        threading.Thread(target=self._train, daemon=True).start()

    def _auth(self, context) -> None:
        if self.token and dict(context.invocation_metadata()).get("authorization") != f"Bearer {self.token}":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

    def SubmitExamples(self, request, context):
        from trainer_side.data import ExampleError

        self._auth(context)
        with self.lock:
            if self.total - self.cursor + len(request.examples) > self.max_pending:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "would exceed max_pending_examples: wait")
        try:
            rendered = [self.renderer.render(e, i) for i, e in enumerate(request.examples)]
        except ExampleError as err:
            context.abort(err.code, str(err))
        for e in rendered:
            if e.example_id in self.ids:
                context.abort(grpc.StatusCode.ALREADY_EXISTS, f"example_id {e.example_id!r} was already submitted")
        with self.lock:
            self.ids.update(e.example_id for e in rendered)
            self.batches.append(len(rendered))
            self.total += len(rendered)
            return pb.SubmitExamplesResponse(example_ids=[e.example_id for e in rendered],
                                             pending_examples=self.total - self.cursor)

    def GetTrainingStatus(self, request, context):
        self._auth(context)
        with self.lock:
            return pb.GetTrainingStatusResponse(
                running=self.training.is_set(), step=self.step, weights_version=self.step, last_loss=1.0 / (1 + self.step),
                trained_examples=self.cursor, pending_examples=self.total - self.cursor, inference_connected=True)

    def StreamProgress(self, request, context):
        self._auth(context)
        events: queue.Queue = queue.Queue()
        self.watchers.append(events)
        try:
            while context.is_active() and not self.stopped.is_set():
                try:
                    yield events.get(timeout=0.1)
                except queue.Empty:
                    pass
        finally:
            self.watchers.remove(events)

    def _train(self) -> None:
        while not self.stopped.wait(0.05):
            if not self.training.is_set():
                continue
            with self.lock:
                n = min(2, self.total - self.cursor)
                if not n:
                    continue
                self.cursor += n
                self.step += 1
                event = pb.StreamProgressResponse(kind=pb.PROGRESS_KIND_STEP, step=self.step, loss=1.0 / (1 + self.step),
                                                  weights_version=self.step, pending_examples=self.total - self.cursor)
            for watcher in list(self.watchers):
                watcher.put(event)


@pytest.fixture()
def fake(tmp_path, request):
    kwargs = getattr(request, "param", {})
    trainer = FakeTrainer(**kwargs)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_TrainerServiceServicer_to_server(trainer, server)
    trainer.address = f"unix://{tmp_path}/fake-trainer.sock"
    server.add_insecure_port(trainer.address)
    server.start()
    yield trainer
    trainer.stopped.set()
    server.stop(0)


def write(tmp_path: Path, *lines: object) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_bytes(jsonl(*lines))
    return path


def test_sends_in_batches_and_prints_what_is_pending(tmp_path, fake):
    path = write(tmp_path, CHAT, PROMPT_COMPLETION, b"", CONVERSATIONAL, SEGMENTS, TOKENS, CHAT)
    result = weightshare("submit", str(path), "--trainer", fake.address, "--batch-size", "4")
    assert result.returncode == 0, result.stderr
    assert fake.batches == [4, 2]
    assert result.stdout.strip() == f"sent 6 examples from {path} to {fake.address}; 6 pending on the trainer"
    sent = [r for r in records(result) if r["event"] == "sent"]
    assert [(r["examples"], r["of"], r["lines"]) for r in sent] == [(4, 6, "1-5"), (6, 6, "6-7")]


def test_a_refused_example_is_named_by_its_file_line(tmp_path, fake):
    # Valid for the client, refused by the trainer: an id outside the 512-token vocabulary, in the second batch.
    path = write(tmp_path, CHAT, CHAT, b"", CHAT, {"input_ids": [1, 600], "loss_mask": [0, 1]}, CHAT)
    result = weightshare("submit", str(path), "--trainer", fake.address, "--batch-size", "2")
    assert result.returncode == 2
    first, summary = errors(result)
    assert first == (f"{path}:5: refused by the trainer: example.tokens.input_ids[1] = 600 is not below the "
                     "vocabulary size 512")
    assert summary == (f"the trainer refused line 5 (INVALID_ARGUMENT, above): the 2 examples of lines 1-2 were "
                       "accepted and will be trained; nothing from line 4 on was stored; fix it, then submit the "
                       f"rest: tail -n +4 {path} | weightshare submit -")
    assert fake.batches == [2]


def test_a_resubmitted_id_is_named_by_its_file_line(tmp_path, fake):
    path = write(tmp_path, {**CHAT, "id": "one"}, {**TOKENS, "id": "two"})
    assert weightshare("submit", str(path), "--trainer", fake.address).returncode == 0
    again = weightshare("submit", str(path), "--trainer", fake.address, "--batch-size", "1")
    assert again.returncode == 2
    assert errors(again) == [f"{path}:1: refused by the trainer: example_id 'one' was already submitted",
                             ("the trainer refused line 1 (ALREADY_EXISTS, above): nothing was stored; fix it and "
                             "submit again")]


@pytest.mark.parametrize("fake", [{"token": "s3cret"}], indirect=True)
def test_a_wrong_token_says_to_pass_the_token(tmp_path, fake):
    path = write(tmp_path, CHAT)
    result = weightshare("submit", str(path), "--trainer", fake.address, env={"WEIGHTSHARE_TOKEN": "wrong"})
    assert result.returncode == 1
    [line] = errors(result)
    assert line.startswith(f"the trainer at {fake.address} refused the token (missing or wrong bearer token): "
                           "pass --token TOKEN (or set WEIGHTSHARE_TOKEN)")
    assert fake.batches == []
    assert weightshare("submit", str(path), "--trainer", fake.address, "--token", "s3cret").returncode == 0


@pytest.mark.parametrize("fake", [{"max_pending": 4}], indirect=True)
def test_wait_follows_training_to_the_summary(tmp_path, fake):
    # Three examples of someone else's are queued ahead; the queue holds 4, so batches wait for room.
    fake.SubmitExamples(pb.SubmitExamplesRequest(examples=[pb.Example(tokens=pb.TokenExample(
        input_ids=[1, 2], loss_mask=[False, True]))] * 3), context=None)
    path = write(tmp_path, *[CHAT, PROMPT_COMPLETION, SEGMENTS, TOKENS, CONVERSATIONAL] * 2, CHAT)
    threading.Timer(1.0, fake.training.set).start()  # training starts a second later
    started = time.monotonic()
    result = weightshare("submit", str(path), "--trainer", fake.address, "--batch-size", "3", "--wait",
                         "--timeout", "60")
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 30
    assert (fake.cursor, fake.total) == (14, 14)
    summary = re.fullmatch(rf"sent 11 examples from {re.escape(str(path))}; trained 11 of 11 in (\d+) steps "
                           r"\(0 skipped\); step (\d+), last loss (\S+), weights version (\d+)\n", result.stdout)
    assert summary, result.stdout
    steps, step, loss, version = summary.groups()
    assert int(steps) == int(step) == int(version) == fake.step >= 7  # 14 examples, at most 2 a step
    assert loss == f"{1 / (1 + fake.step):.4f}"
    logged = records(result)
    assert any(r["event"] == "the trainer's queue is full; waiting for it to train some" for r in logged)
    training = [r for r in logged if r["event"] == "training"]
    assert training[-1]["trained"] == 11 and training[-1]["of"] == 11
    assert [r["trained"] for r in training] == sorted(r["trained"] for r in training)


def test_wait_times_out_with_what_is_stored(tmp_path, fake):
    path = write(tmp_path, CHAT, TOKENS)  # nothing trains: the loop is not running
    result = weightshare("submit", str(path), "--trainer", fake.address, "--wait", "--timeout", "3")
    assert result.returncode == 1
    assert any(r["event"].startswith("the trainer's training loop is not running") for r in records(result))
    assert errors(result) == [("--timeout 3 s passed: 0 of the 2 examples sent are trained; all are stored on the "
                              "trainer and will be trained")]
    assert fake.total == 2


# --- End to end: real vLLM, real trainer ---


@pytest.fixture(scope="module")
def served(tiny_model_path, tmp_path_factory):
    from weightshare.processes import ServedModel

    tmp = tmp_path_factory.mktemp("submit")
    with ServedModel(tiny_model_path("qwen3_5"), f"unix://{tmp}/export.sock", log_path=tmp / "serve.log") as s:
        yield s


@pytest.mark.vllm
@pytest.mark.slow
def test_submit_and_wait_trains_every_example_of_every_format(served, tmp_path):
    from tests.test_training_service import Trainer

    trainer = Trainer(served, tmp_path / "state", "--lr", "5e-3", "--examples-per-step", "2")
    try:
        mixed = write(tmp_path, CHAT, b"", PROMPT_COMPLETION, CONVERSATIONAL, SEGMENTS, TOKENS,
                      {**CHAT, "id": "chat-2"}, {"prompt": "", "completion": "the sun"})
        result = weightshare("submit", str(mixed), "--trainer", trainer.address, "--batch-size", "3", "--wait",
                             "--timeout", "300", timeout_s=400)
        assert result.returncode == 0, result.stderr
        summary = re.fullmatch(rf"sent 7 examples from {re.escape(str(mixed))}; trained 7 of 7 in (\d+) steps "
                               r"\(0 skipped\); step (\d+), last loss (\d+\.\d{4}), weights version (\d+)\n",
                               result.stdout)
        assert summary, result.stdout
        status = trainer.status()
        assert (status.trained_examples, status.pending_examples, status.skipped_steps) == (7, 0, 0)
        assert summary.groups() == (str(status.step), str(status.step), f"{status.last_loss:.4f}",
                                    str(status.weights_version))
        assert 4 <= status.step <= 7  # 2 examples a step at most

        # Two bad lines: exit 2 naming both, and nothing reaches the trainer.
        bad = tmp_path / "bad.jsonl"
        bad.write_bytes(jsonl(CHAT, {"messages": [{"role": "user", "content": "hi"}]}, PROMPT_COMPLETION,
                              {"prompt": "x", "completion": ""}, TOKENS))
        refused = weightshare("submit", str(bad), "--trainer", trainer.address, "--wait")
        assert refused.returncode == 2
        assert errors(refused)[:2] == [f"{bad}:2: messages has no assistant turn: nothing to train on",
                                       f"{bad}:4: completion is empty: it is what the model learns"]
        after = trainer.status()
        assert (after.trained_examples, after.pending_examples) == (7, 0)
        assert trainer.terminate() == 0
    finally:
        trainer.kill()
