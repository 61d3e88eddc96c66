"""Fast unit tests of the trainer's data path and loop, no vLLM: validation, masks, the store, checkpoints.

- `Renderer`: chat rendering with the tiny models' chat template, loss only on assistant turns, every
  validation error naming its field and value, and the gRPC code it maps to; oversized chats refused
  before any (or after one) render; the offsets-based mask equal to tokenizing every prefix (tiny
  WordLevel and a byte-level BPE trained in the test, with and without offsets).
- `ExampleStore`: fsync'd append, cursor, reopen after a crash (partial last line dropped), duplicates.
- `TrainingLoop` on a tiny in-process llama with a recording stand-in for the update stream: begin ->
  step -> commit per step, non-finite steps skipped without begin, checkpoint + restore of the cursor.

Run as: .venv/bin/python -m pytest tests/test_trainer_data.py -q
"""

from __future__ import annotations

import threading

import pytest

from trainer_side.data import ExampleError, ExampleStore, Renderer, TokenizedExample
from weightshare.tiny_model import VOCAB_SIZE, build_tokenizer
from weightshare.v1 import trainer_service_pb2 as pb


@pytest.fixture(scope="module")
def renderer() -> Renderer:
    return Renderer(build_tokenizer(), VOCAB_SIZE, max_seq_len=64)


def chat(*turns: tuple[str, str], example_id: str = "") -> pb.Example:
    return pb.Example(
        example_id=example_id,
        chat=pb.ChatExample(messages=[pb.ChatMessage(role=r, content=c) for r, c in turns]),
    )


def tokens(ids: list[int], mask: list[bool], example_id: str = "") -> pb.Example:
    return pb.Example(example_id=example_id, tokens=pb.TokenExample(input_ids=ids, loss_mask=mask))


def test_chat_mask_covers_assistant_turns_only(renderer):
    tok = renderer.tokenizer
    example = chat(("system", "you are a cat"), ("user", "hello"), ("assistant", "green house"),
                   ("user", "why"), ("assistant", "the sun"))
    rendered = renderer.render(example)
    assert len(rendered.example_id) == 32  # assigned
    masked = [t for t, m in zip(rendered.input_ids, rendered.loss_mask) if m]
    # Each assistant turn's content and its end-of-turn token, nothing of the prompt.
    assert tok.convert_ids_to_tokens(masked) == ["green", "house", "<|im_end|>", "the", "sun", "<|im_end|>"]
    assert renderer.render(chat(("user", "hi"), ("assistant", "yes"), example_id="mine")).example_id == "mine"


@pytest.mark.parametrize(
    ("example", "message"),
    [
        (pb.Example(), "examples[0]: content is not set"),
        (chat(), "examples[0].chat.messages is empty"),
        (chat(("user", "hi")), "has no assistant turn"),
        (chat(("robot", "hi"), ("assistant", "yes")), "messages[0].role = 'robot' is not one of"),
        (tokens([1, 2, VOCAB_SIZE], [0, 1, 1]), f"input_ids[2] = {VOCAB_SIZE} is not below the vocabulary size"),
        (tokens([1, 2, 3], [0, 1]), "loss_mask has 2 entries but input_ids has 3"),
        (tokens([], []), "input_ids is empty"),
        (tokens([1, 2, 3], [1, 0, 0]), "no training target"),
        (tokens(list(range(65)), [1] * 65),
         ("65 tokens is longer than the trainer's max_seq_len 64: shorten it, "
          "or restart `weightshare train` with a larger --max-seq-len")),
        (chat(("user", "hi"), ("assistant", "  ")), "messages[1].content is empty"),
    ],
)
def test_invalid_examples_name_field_and_value(renderer, example, message):
    with pytest.raises(ExampleError, match=message.replace("[", r"\[").replace("]", r"\]")) as info:
        renderer.render(example)
    assert info.value.code_name == "INVALID_ARGUMENT"


def test_tokenizer_without_chat_template_is_a_failed_precondition():
    tokenizer = build_tokenizer()
    tokenizer.chat_template = None
    no_template = Renderer(tokenizer, VOCAB_SIZE, 64)
    with pytest.raises(ExampleError, match="has no chat template") as info:
        no_template.render(chat(("user", "hi"), ("assistant", "yes")))
    assert info.value.code_name == "FAILED_PRECONDITION"
    assert no_template.render(tokens([1, 2], [0, 1])).loss_mask == (False, True)  # tokens still work


def example(i: int) -> TokenizedExample:
    return TokenizedExample(f"e{i}", (1, 2, 3 + i), (False, True, True))


def test_store_persists_and_resumes_at_cursor(tmp_path):
    store = ExampleStore(tmp_path)
    assert store.append([example(0), example(1)]) == 2
    assert store.append([example(2)]) == 3
    assert [e.example_id for e in store.peek(2, timeout_s=0)] == ["e0", "e1"]
    store.consume(2)
    assert (store.cursor, store.pending) == (2, 1)
    with pytest.raises(ExampleError, match="'e1' was already submitted") as info:
        store.append([example(3), example(1)])
    assert info.value.code_name == "ALREADY_EXISTS"
    assert store.total == 3  # all or nothing
    with pytest.raises(ExampleError, match=r"examples\[1\].example_id 'e7' appears twice") as info:
        store.append([example(7), example(7)])
    assert info.value.code_name == "INVALID_ARGUMENT" and store.total == 3
    store.close()

    # A crash mid-append leaves half a line: it was never acknowledged and is dropped on reopen.
    with open(tmp_path / "examples.jsonl", "ab") as f:
        f.write(b'{"id":"half","input_')
    reopened = ExampleStore(tmp_path, cursor=2)
    assert (reopened.total, reopened.pending) == (3, 1)
    assert reopened.peek(5, timeout_s=0) == [example(2)]
    assert reopened.append([example(4)]) == 2
    reopened.close()
    with pytest.raises(ValueError, match="cursor 9 is outside the store's 4 examples"):
        ExampleStore(tmp_path, cursor=9)


def test_store_peek_waits_for_an_append(tmp_path):
    store = ExampleStore(tmp_path)
    threading.Timer(0.1, store.append, [[example(0)]]).start()
    assert store.peek(1, timeout_s=5) == [example(0)]
    store.close()


class RecordingUpdates:
    """Stands in for UpdateStream: records calls, acknowledges commits with an increasing version."""

    def __init__(self, calls: list):
        self.calls = calls

    def begin(self, step, max_pause_seconds=0.0):
        self.calls.append(("begin", step))

    def commit(self, step):
        self.calls.append(("commit", step))
        return pb_ack(step)

    def abort(self, reason):
        self.calls.append(("abort", reason))

    def close(self):
        self.calls.append(("close",))


def pb_ack(step: int):
    from weightshare.v1 import weight_export_service_pb2 as export_pb

    return export_pb.UpdateWeightsResponse(weights_version=step, step=step, paused_seconds=0.001)


@pytest.fixture()
def tiny_loop(tmp_path, tiny_model_path):
    import torch
    from transformers import AutoModelForCausalLM

    from trainer_side.loop import LoopConfig, TrainingLoop
    from trainer_side.param_groups import build_optimizer, preset

    model_dir = tiny_model_path("llama", "float32")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    events, calls = [], []

    def make(config: LoopConfig, store: ExampleStore) -> TrainingLoop:
        optimizer = build_optimizer(model, preset("apollo_mini", lr=config.lr))
        return TrainingLoop(model, optimizer, store, lambda: RecordingUpdates(calls), tmp_path, str(model_dir),
                            config, events.append)

    return make, model, events, calls


def wait_for(predicate, timeout_s: float = 60.0) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_loop_steps_inside_the_update_protocol_and_resumes(tmp_path, tiny_loop):
    import torch

    from trainer_side.loop import LoopConfig, latest_checkpoint, read_checkpoint_state

    make, model, events, calls = tiny_loop
    store = ExampleStore(tmp_path)
    store.append([TokenizedExample(f"x{i}", (5, 6, 7, 8), (False, True, True, True)) for i in range(6)])
    loop = make(LoopConfig(lr=1e-2, warmup_steps=2, examples_per_step=2, max_steps=2, batch_wait_s=0.1,
                           gradient_checkpointing=True), store)
    assert model.is_gradient_checkpointing
    before = model.model.norm.weight.detach().clone()
    loop.start()
    wait_for(lambda: not loop.running)
    kinds = [pb.ProgressKind.Name(e.kind) for e in events]
    assert kinds == ["PROGRESS_KIND_STEP", "PROGRESS_KIND_STEP", "PROGRESS_KIND_CHECKPOINT",
                     "PROGRESS_KIND_STOPPED"]
    assert calls == [("begin", 1), ("commit", 1), ("begin", 2), ("commit", 2), ("close",)]
    assert events[1].weights_version == 2 and events[1].tokens == 6 and events[1].pending_examples == 2
    assert [e.learning_rate for e in events[:2]] == [5e-3, 1e-2]  # linear warm-up
    assert not torch.equal(before, model.model.norm.weight)
    checkpoint = latest_checkpoint(tmp_path)
    assert checkpoint.name == "step-00000002"
    assert read_checkpoint_state(checkpoint)["cursor"] == 4
    assert {"model.safetensors", "config.json", "tokenizer.json", "optimizer.pt"} <= {
        p.name for p in checkpoint.iterdir()}

    # Non-finite loss: skipped before begin, nothing written, examples consumed.
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    calls.clear()
    events.clear()
    loop.start(LoopConfig(lr=1e-2, examples_per_step=2, max_steps=1, batch_wait_s=0.1))
    wait_for(lambda: store.pending == 0)
    loop.stop(checkpoint=False)
    assert calls == [("close",)]
    assert events[0].kind == pb.PROGRESS_KIND_SKIPPED and "non-finite" in events[0].message
    assert loop.status().skipped_steps == 1

    # Restart: a new store at the checkpoint's cursor and a restored loop pick up at step 2.
    store.close()
    reopened = ExampleStore(tmp_path, cursor=read_checkpoint_state(checkpoint)["cursor"])
    resumed = make(LoopConfig(lr=1e-2), reopened)
    resumed.restore(checkpoint)
    assert (resumed.counters.step, reopened.pending, reopened.cursor) == (2, 2, 4)
    reopened.close()


def test_fused_loop_begins_before_backward_and_frees_gradients(tmp_path, tiny_loop):
    import torch

    from trainer_side.loop import LoopConfig

    make, model, events, calls = tiny_loop
    store = ExampleStore(tmp_path)
    store.append([TokenizedExample(f"f{i}", (5, 6, 7, 8, 9)[: 3 + i % 3], (False, True, True, True, True)[: 3 + i % 3])
                  for i in range(4)])
    loop = make(LoopConfig(lr=1e-2, examples_per_step=2, micro_batch_size=2, fused_step=True, max_steps=2,
                           batch_wait_s=0.1, memory_report=True), store)
    seen_grads_at_begin = []
    original_begin = loop._begin

    def begin(step):  # in a fused step nothing is written before begin, and no gradient exists yet
        seen_grads_at_begin.append(sum(p.grad is not None for p in model.parameters()))
        original_begin(step)

    loop._begin = begin
    before = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    loop.start()
    wait_for(lambda: not loop.running)
    assert [pb.ProgressKind.Name(e.kind) for e in events][:2] == ["PROGRESS_KIND_STEP", "PROGRESS_KIND_STEP"]
    assert calls[:4] == [("begin", 1), ("commit", 1), ("begin", 2), ("commit", 2)]
    assert seen_grads_at_begin == [0, 0]
    assert all(p.grad is None for p in model.parameters())
    assert events[0].grad_norm > 0 and events[0].tokens > 0
    assert not torch.equal(before, model.model.layers[0].mlp.down_proj.weight)
    with pytest.raises(ValueError, match="must equal micro_batch_size"):
        LoopConfig(fused_step=True, examples_per_step=4, micro_batch_size=1)


def test_kernel_warmup_writes_nothing_and_trains_as_without_it(tmp_path, tiny_loop):
    """The warm-up backward before a fused run's first update (on by default on CUDA, forced here) changes no
    weight, leaves no gradient, and the steps that follow equal those of a run without it."""
    import torch

    from trainer_side.loop import LoopConfig

    make, model, _events, calls = tiny_loop
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    trained = []
    for warmup in (False, True):
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(initial[n])
        store = ExampleStore(tmp_path / f"warmup-{warmup}")
        store.append([TokenizedExample(f"w{i}", (5, 6, 7, 8, 9), (False, True, True, True, True)) for i in range(4)])
        loop = make(LoopConfig(lr=1e-2, examples_per_step=2, micro_batch_size=2, fused_step=True, max_steps=2,
                               batch_wait_s=0.1, kernel_warmup=warmup), store)
        warmed = []
        original_warm_up, calls_before = loop._warm_up, len(calls)

        def warm_up(batch, tokens, original=original_warm_up, warmed=warmed, earlier=calls_before):
            assert not calls[earlier:], "the warm-up must run before any update begins"
            original(batch, tokens)
            warmed.append(all(torch.equal(p, initial[n]) for n, p in model.named_parameters()))
            warmed.append(all(p.grad is None for p in model.parameters()))

        loop._warm_up = warm_up
        loop.start()
        wait_for(lambda loop=loop: not loop.running)
        loop._fused.remove()
        assert warmed == ([True, True] if warmup else []), warmed
        trained.append({n: p.detach().clone() for n, p in model.named_parameters()})
    assert any(not torch.equal(value, initial[name]) for name, value in trained[0].items()), "nothing trained"
    for name, value in trained[0].items():
        torch.testing.assert_close(trained[1][name], value, rtol=0, atol=0, msg=name)


def test_interrupted_checkpoint_leaves_nothing_behind(tmp_path, tiny_loop):
    from trainer_side.checkpoint_writer import CheckpointInterrupted
    from trainer_side.loop import CHECKPOINTS_DIR, LoopConfig, latest_checkpoint

    make, _, _, _ = tiny_loop
    loop = make(LoopConfig(), ExampleStore(tmp_path))
    loop.interrupt_checkpoint()  # a second SIGTERM while the final checkpoint would be written
    with pytest.raises(CheckpointInterrupted):
        loop.save_checkpoint()
    assert latest_checkpoint(tmp_path) is None
    assert not list((tmp_path / CHECKPOINTS_DIR).iterdir())


def test_a_live_unix_socket_is_never_taken_over(tmp_path):
    import socket

    from weightshare import grpc_util

    path = tmp_path / "live.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen()
    with pytest.raises(grpc_util.AddressInUse, match="another live process"):
        grpc_util.remove_stale_socket(f"unix://{path}")
    assert path.exists()
    listener.close()  # the server died; its file stays behind
    grpc_util.remove_stale_socket(f"unix://{path}")
    assert not path.exists()
    (tmp_path / "plain").write_text("x")
    with pytest.raises(grpc_util.AddressInUse, match="not a socket"):
        grpc_util.remove_stale_socket(f"unix://{tmp_path}/plain")


def test_overrides_apply_to_one_run_only(tmp_path, tiny_loop):
    from trainer_side.loop import LoopConfig

    make, _, _, _ = tiny_loop
    loop = make(LoopConfig(lr=1e-3, batch_wait_s=0.05), ExampleStore(tmp_path))
    overridden = loop.with_overrides(pb.TrainingOverrides(max_steps=5, learning_rate=0.5))
    assert (overridden.max_steps, overridden.lr) == (5, 0.5)
    loop.start(overridden)
    assert loop.config.max_steps == 5
    loop.stop(checkpoint=False)
    loop.start()  # StartTraining {} later: the configured settings again
    assert loop.config == loop.base_config and loop.config.max_steps == 0 and loop.config.lr == 1e-3
    loop.stop(checkpoint=False)
    assert loop.with_overrides(pb.TrainingOverrides()).max_steps == 0


# --- Chat rendering is bounded before it is done, and its mask is the prefix-tokenization mask ---


def prefix_tokenization_reference(renderer: Renderer, example: pb.Example) -> tuple[tuple[int, ...], tuple[bool, ...]]:
    """The mask as it was first computed: every assistant turn's prefixes rendered and tokenized."""
    messages = [{"role": m.role, "content": m.content} for m in example.chat.messages]

    def tokens(prefix: list[dict], add_generation_prompt: bool) -> list[int]:
        if not prefix:
            return []
        text = renderer.tokenizer.apply_chat_template(prefix, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
        return list(renderer.tokenizer(text, add_special_tokens=False)["input_ids"])

    ids = tokens(messages, False)
    mask = [False] * len(ids)
    for turn in [i for i, m in enumerate(messages) if m["role"] == "assistant"]:
        start = len(tokens(messages[:turn], True)) if turn else 0
        upto = tokens(messages[: turn + 1], False)
        assert ids[: len(upto)] == upto and start <= len(upto), "not a prefix: the reference refuses it"
        for i in range(start, len(upto)):
            mask[i] = True
    return tuple(ids), tuple(mask)


def byte_level_bpe_tokenizer():
    """A GPT-2-style byte-level BPE trained here on a few words, whose post-processor trims the leading
    space off a token's offsets, with a template whose generation prompt ends in a space: the prompt
    then ends inside the " word" token that follows it, which trimmed offsets would hide."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(["user: hello there, the sun is a star. assistant: the green house"] * 20, trainer)
    backend.post_processor = processors.ByteLevel(trim_offsets=True)
    template = (
        "{%- for message in messages -%}"
        "{{ '<|im_start|>' + message['role'] + ': ' + message['content'] + '<|im_end|>\\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant: ' }}{%- endif -%}"
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", chat_template=template)


CONVERSATIONS = {
    "system_user_assistant": chat(("system", "you are a cat"), ("user", "hello"), ("assistant", "green house")),
    "assistant_first": chat(("assistant", "hello there"), ("user", "why"), ("assistant", "the sun")),
    "multi_turn": chat(("system", "be brief"), *[t for i in range(8) for t in (
        ("user", f"question {i} please"), ("assistant", f"answer {i}: the sun is a star"))]),
    "unicode": chat(("user", "héllo wörld, 日本語は? 🐱🐶"), ("assistant", "ça va — naïve café ✓ 🌞"),
                    ("user", "Ω≈ç√"), ("assistant", "ok 👍🏽 done")),
    "whitespace": chat(("user", "  two  spaces\n\nand newlines\t"), ("assistant", " leading space"),
                       ("user", "\n"), ("assistant", "trailing   \n")),
    "long_content": chat(("user", "tell story " * 60), ("assistant", "once upon a time " * 80),
                         ("user", "more"), ("assistant", "the end " * 40)),
}


@pytest.fixture(scope="module", params=["word_level", "byte_level_bpe"])
def any_tokenizer(request):
    return build_tokenizer() if request.param == "word_level" else byte_level_bpe_tokenizer()


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("offsets", [True, False], ids=["offsets", "no_offsets"])
def test_chat_mask_equals_prefix_tokenization(any_tokenizer, name, offsets):
    renderer = Renderer(any_tokenizer, VOCAB_SIZE, max_seq_len=2048)
    if not offsets:  # a slow tokenizer: every prefix is tokenized
        renderer._offsets_tokenizer = None
    example = CONVERSATIONS[name]
    rendered = renderer.render(example)
    assert (rendered.input_ids, rendered.loss_mask) == prefix_tokenization_reference(renderer, example)


def test_chat_mask_tokenizes_only_the_whole_conversation(monkeypatch):
    renderer = Renderer(build_tokenizer(), VOCAB_SIZE, max_seq_len=2048)
    tokenized = []
    tokenize = renderer._tokenize
    monkeypatch.setattr(renderer, "_tokenize", lambda text: tokenized.append(text) or tokenize(text))
    example = CONVERSATIONS["multi_turn"]
    rendered = renderer.render(example)
    assert len(tokenized) == 1  # the prefixes' token counts come from the offsets
    assert (rendered.input_ids, rendered.loss_mask) == prefix_tokenization_reference(renderer, example)


def test_large_valid_multi_turn_chat_equals_prefix_tokenization(any_tokenizer):
    renderer = Renderer(any_tokenizer, VOCAB_SIZE, max_seq_len=8192)
    example = chat(("system", "you are a cat"), *[t for i in range(100) for t in (
        ("user", f"hello {i}, why is the sky blue?"), ("assistant", f"the sun {i} — a big star ✓"))])
    rendered = renderer.render(example)
    assert len(rendered.input_ids) > 1000
    assert (rendered.input_ids, rendered.loss_mask) == prefix_tokenization_reference(renderer, example)


def counting_renderer(monkeypatch, max_seq_len: int) -> tuple[Renderer, list]:
    tokenizer = build_tokenizer()
    renders = []
    apply = tokenizer.apply_chat_template
    monkeypatch.setattr(tokenizer, "apply_chat_template", lambda *a, **k: renders.append(a) or apply(*a, **k))
    return Renderer(tokenizer, VOCAB_SIZE, max_seq_len), renders


def test_thousands_of_turns_are_refused_before_rendering(monkeypatch):
    renderer, renders = counting_renderer(monkeypatch, max_seq_len=2048)
    example = chat(("user", "hi"), *[("assistant", "a")] * 3000)
    with pytest.raises(ExampleError) as info:
        renderer.render(example)
    assert info.value.code_name == "INVALID_ARGUMENT"
    assert str(info.value) == (
        "examples[0].chat.messages has 3001 messages, more than the trainer's max_seq_len 2048 tokens can hold: "
        "shorten it, or restart `weightshare train` with a larger --max-seq-len")
    assert renders == []


def test_too_many_tokens_is_refused_after_one_render(monkeypatch):
    renderer, renders = counting_renderer(monkeypatch, max_seq_len=64)
    example = chat(*[t for _ in range(10) for t in (("user", "hello there"), ("assistant", "the sun"))])
    with pytest.raises(ExampleError) as info:
        renderer.render(example)
    assert info.value.code_name == "INVALID_ARGUMENT"
    assert str(info.value).startswith("examples[0]: 100 tokens is longer than the trainer's max_seq_len 64: ")
    assert str(info.value).endswith("restart `weightshare train` with a larger --max-seq-len")
    assert len(renders) == 1  # the whole conversation, no prefix


def test_too_many_characters_are_refused_before_rendering(monkeypatch):
    renderer, renders = counting_renderer(monkeypatch, max_seq_len=64)
    with pytest.raises(ExampleError, match=r"examples\[0\].chat.messages hold 4097 characters of content, more than "
                       r"64 a token of the trainer's max_seq_len 64 \(4096\): .* --max-seq-len") as info:
        renderer.render(chat(("user", "x" * 4000), ("assistant", "y" * 97)))
    assert info.value.code_name == "INVALID_ARGUMENT" and renders == []
    assert renderer.render(chat(("user", "x" * 4000), ("assistant", "y" * 96))).target_tokens == 2  # <unk>, end


@pytest.mark.parametrize("offsets", [True, False], ids=["offsets", "no_offsets"])
def test_template_that_rewrites_earlier_turns_is_a_failed_precondition(offsets):
    tokenizer = build_tokenizer()
    # Prefixes every conversation with its length: messages[:i] is not a prefix of the whole.
    tokenizer.chat_template = "{{ messages | length | string }} " + tokenizer.chat_template
    renderer = Renderer(tokenizer, VOCAB_SIZE, 64)
    if not offsets:
        renderer._offsets_tokenizer = None
    with pytest.raises(ExampleError, match=r"does not render messages\[:2\] as a prefix") as info:
        renderer.render(chat(("user", "hi"), ("assistant", "yes"), ("user", "why"), ("assistant", "no")))
    assert info.value.code_name == "FAILED_PRECONDITION"


def test_a_template_that_raises_is_an_invalid_argument():
    tokenizer = build_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m.role == 'system' and not loop.first %}"
        "{{ raise_exception('system message must come first') }}{% endif %}{{ m.content }}{% endfor %}"
    )
    strict = Renderer(tokenizer, VOCAB_SIZE, 64)
    with pytest.raises(ExampleError, match=r"examples\[0\]\.chat: .*refused.*system message must come first") as info:
        strict.render(chat(("user", "hi"), ("system", "late"), ("assistant", "yes")))
    assert info.value.code_name == "INVALID_ARGUMENT"


def test_store_rewinds_to_a_checkpoint_cursor(tmp_path):
    store = ExampleStore(tmp_path)
    store.append([example(0), example(1), example(2)])
    store.consume(3)
    store.rewind(1)
    assert (store.cursor, store.pending) == (1, 2)
    assert [e.example_id for e in store.peek(5, timeout_s=0)] == ["e1", "e2"]
    with pytest.raises(ValueError, match="outside"):
        store.rewind(4)


# --- Text examples (prompt/completion, raw text with a mask): no chat template, exact per-segment mask ---


def text(*segments: tuple[str, bool], add_eos: bool = False, example_id: str = "") -> pb.Example:
    return pb.Example(example_id=example_id, text=pb.TextExample(
        segments=[pb.TextSegment(text=t, train=train) for t, train in segments], add_eos=add_eos))


def separately(tokenizer, *texts: str) -> list[list[int]]:
    return [list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]


def test_prompt_completion_trains_the_completion_and_eos_only(renderer):
    tok = renderer.tokenizer
    rendered = renderer.render(text(("what is the color of the sky", False), (" green house", True), add_eos=True))
    prompt, completion = separately(tok, "what is the color of the sky", " green house")
    assert rendered.input_ids == (*prompt, *completion, tok.eos_token_id)
    assert rendered.loss_mask == (False,) * len(prompt) + (True,) * (len(completion) + 1)
    masked = [t for t, m in zip(rendered.input_ids, rendered.loss_mask) if m]
    assert tok.convert_ids_to_tokens(masked) == ["green", "house", "<|im_end|>"]
    # Without add_eos nothing is appended; special-token strings in the text are read as special tokens.
    plain = renderer.render(text(("hello", False), ("the sun<|im_end|>", True), example_id="t1"))
    assert tok.convert_ids_to_tokens(list(plain.input_ids)) == ["hello", "the", "sun", "<|im_end|>"]
    assert plain.loss_mask == (False, True, True, True) and plain.example_id == "t1"
    # add_eos never doubles an end the text already has.
    assert renderer.render(text(("hello", False), ("the sun<|im_end|>", True), add_eos=True)).input_ids == \
        plain.input_ids


def test_text_segments_are_tokenized_separately_so_the_mask_is_exact():
    # A byte-level BPE whose whole-text tokens cross the boundary: "assistant: " + "the" would merge the
    # space into " the" had the text been tokenized as one; separately, every token is one segment's.
    tok = byte_level_bpe_tokenizer()
    renderer = Renderer(tok, VOCAB_SIZE, max_seq_len=256)
    segments = [("user: hello there, the sun is a star. assistant: ", False), ("the green house", True),
                ("\nuser: hello", False), (" the sun", True)]
    rendered = renderer.render(text(*segments))
    pieces = separately(tok, *(t for t, _ in segments))
    assert rendered.input_ids == tuple(i for piece in pieces for i in piece)
    assert rendered.loss_mask == tuple(train for (_, train), piece in zip(segments, pieces) for _ in piece)
    whole = list(tok("".join(t for t, _ in segments), add_special_tokens=False)["input_ids"])
    assert whole != list(rendered.input_ids)  # the whole text tokenizes differently across a boundary


def bos_eos_tokenizer():
    """The tiny tokenizer, post-processed like Llama tokenizers configured to add both BOS and EOS."""
    from tokenizers import processors

    tok = build_tokenizer()
    bos, eos = tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A <|im_end|>", special_tokens=[("<|endoftext|>", bos), ("<|im_end|>", eos)])
    return tok


def test_text_gets_the_tokenizers_sequence_special_tokens_once():
    tok = bos_eos_tokenizer()
    assert tok("hello")["input_ids"][0] == tok.convert_tokens_to_ids("<|endoftext|>")
    renderer = Renderer(tok, VOCAB_SIZE, max_seq_len=64)
    rendered = renderer.render(text(("hello there", False), ("green house", True), add_eos=True))
    # BOS once before the whole (never a target), EOS once after it (a target: the last segment trains),
    # and add_eos adds no second EOS.
    assert tok.convert_ids_to_tokens(list(rendered.input_ids)) == [
        "<|endoftext|>", "hello", "there", "green", "house", "<|im_end|>"]
    assert rendered.loss_mask == (False, False, False, True, True, True)
    last_untrained = renderer.render(text(("green house", True), ("thanks", False)))
    assert last_untrained.loss_mask == (False, True, True, False, False)


class CountingTokenizer:
    """Wraps a tokenizer and records every text it is asked to tokenize."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.calls: list = []

    def __call__(self, texts, **kwargs):
        self.calls.append(texts)
        return self._tokenizer(texts, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def counting_text_renderer(max_seq_len: int) -> tuple[Renderer, CountingTokenizer]:
    renderer = Renderer(build_tokenizer(), VOCAB_SIZE, max_seq_len)
    renderer.tokenizer = counting = CountingTokenizer(renderer.tokenizer)
    return renderer, counting


@pytest.mark.parametrize(
    ("example", "message"),
    [
        (text(), "examples[0].text.segments is empty"),
        (text(("hello", False), ("", True)), "examples[0].text.segments[1].text is empty: drop the segment"),
        (text(("hello", False), ("there", False)),
         "examples[0].text.segments has no segment with train = true: nothing to train on"),
        (text(*[("a", True)] * 65),
         ("examples[0].text.segments has 65 segments, more than the trainer's max_seq_len 64: shorten it (or join "
          "segments), or restart `weightshare train` with a larger --max-seq-len")),
        (text(("x" * 4000, False), ("y" * 97, True)),
         ("examples[0].text.segments hold 4097 characters, more than 64 a token of the trainer's max_seq_len 64 "
          "(4096): shorten it, or restart `weightshare train` with a larger --max-seq-len")),
    ],
)
def test_invalid_text_is_refused_before_tokenizing(example, message):
    renderer, counting = counting_text_renderer(max_seq_len=64)
    with pytest.raises(ExampleError) as info:
        renderer.render(example)
    assert str(info.value) == message and info.value.code_name == "INVALID_ARGUMENT"
    assert counting.calls == []


@pytest.mark.parametrize(
    ("example", "message"),
    [
        (text(("hello " * 60, False), ("green house " * 3, True), add_eos=True),
         ("examples[0]: 67 tokens is longer than the trainer's max_seq_len 64: shorten it, or restart "
          "`weightshare train` with a larger --max-seq-len")),
        (text(("hello", False), (" \n\t ", True)),
         ("examples[0].text: the trained segments (segments[1]) give no training target: they tokenize to no "
          "tokens, or only to the first token, which nothing precedes to predict it from")),
        (text(("hello", True), ("there", False)), "examples[0].text: the trained segments (segments[0]) give no"),
    ],
)
def test_text_without_room_or_target_is_refused_after_one_tokenization(example, message):
    renderer, counting = counting_text_renderer(max_seq_len=64)
    with pytest.raises(ExampleError) as info:
        renderer.render(example)
    assert str(info.value).startswith(message) and info.value.code_name == "INVALID_ARGUMENT"
    assert len(counting.calls) == 1  # one batched call for all the segments
    assert renderer.render(text(*[(f"w{i}", i == 63) for i in range(64)])).target_tokens == 1  # 64 fit


def test_text_needs_a_tokenizer_and_an_eos_for_add_eos():
    no_tokenizer = Renderer(None, VOCAB_SIZE, 64)
    with pytest.raises(ExampleError, match=r"examples\[0\]\.text: the trainer has no tokenizer .*submit tokens") as info:
        no_tokenizer.render(text(("hello", False), ("there", True)))
    assert info.value.code_name == "FAILED_PRECONDITION"
    tokenizer = build_tokenizer()
    tokenizer.eos_token = None
    no_eos = Renderer(tokenizer, VOCAB_SIZE, 64)
    assert no_eos.render(text(("hello", False), ("there", True))).loss_mask == (False, True)
    with pytest.raises(ExampleError, match=r"examples\[2\]\.text\.add_eos: .* has no eos token") as info:
        no_eos.render(text(("hello", False), ("there", True), add_eos=True), index=2)
    assert info.value.code_name == "FAILED_PRECONDITION"


def test_an_example_with_no_content_names_every_form(renderer):
    with pytest.raises(ExampleError, match="content is not set: give chat, text or tokens"):
        renderer.render(pb.Example(example_id="x"))


def test_long_values_are_cut_in_messages():
    from weightshare.grpc_util import shown

    assert shown("abc") == "'abc'"
    long = "\U0008e09c" * 913
    text = shown(long)
    assert len(text) < 200 and "(913 characters)" in text
