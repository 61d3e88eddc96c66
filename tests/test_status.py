"""Status errors with a stable reason (weightshare/status.py): a real in-process grpc.aio server, no vLLM.

- A tiny generic-handler server aborts with `StatusError`s (and the `UpdateError` / `ExampleError`
  subclasses); aio and sync clients see the code, the message exactly, and `reason_of` / `error_info_of`
  read the reason and metadata from the `google.rpc.ErrorInfo` in the trailer.
- The reasons table in status.py's docstring is well formed, and the services' source raises or aborts
  with exactly the documented reasons, each with its documented code (read from the syntax tree, so
  every raise is checked, including error paths no test reaches).
Milliseconds. Run as: .venv/bin/python -m pytest tests/test_status.py -q
"""

from __future__ import annotations

import ast
import asyncio
import re
from pathlib import Path

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from inference_side.updates import UpdateCoordinator, UpdateError
from trainer_side.data import ExampleError, Renderer
from weightshare import status
from weightshare.grpc_util import shown
from weightshare.status import StatusError, abort, abort_with, error_info_of, reason_of
from weightshare.v1 import trainer_service_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent
# The modules whose errors reach clients: they raise StatusErrors or abort with a reason.
SOURCES = ["inference_side/updates.py", "inference_side/servicer.py", "trainer_side/data.py",
           "trainer_side/service.py", "weightshare/grpc_util.py"]
SERVICERS = ["inference_side/servicer.py", "trainer_side/service.py"]
LONG = "é" * 500  # non-ASCII and longer than grpc_util.shown keeps
LONG_MESSAGE = f"trainer_name {shown(LONG)} is longer than 200 characters"


def documented() -> dict[str, str]:
    """reason -> code name, from the table in weightshare/status.py's docstring."""
    rows = re.findall(r"^\| ([A-Z0-9_]+) \| ([A-Z_]+) \| (.+) \|$", status.__doc__, re.MULTILINE)
    reasons = [reason for reason, _, _ in rows]
    assert len(reasons) == len(set(reasons)), f"reasons documented twice: {sorted(reasons)}"
    return {reason: code for reason, code, _ in rows}


# ---------------------------------------------------------------------------------------------------
# A real server
# ---------------------------------------------------------------------------------------------------


async def _handle(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    kind = request.decode()
    if kind == "status_error":
        await abort(context, StatusError(grpc.StatusCode.INVALID_ARGUMENT, "EXAMPLE_TOO_LONG",
                                         "examples[0]: 40 tokens is longer than the trainer's max_seq_len 32",
                                         {"field": "examples[0]"}))
    if kind == "example_error":
        try:
            Renderer(None, vocab_size=512, max_seq_len=32).render(
                pb.Example(tokens=pb.TokenExample(input_ids=[1, 600], loss_mask=[0, 1])), 3)
        except ExampleError as err:
            await abort(context, err)
    if kind == "update_error":
        try:
            await UpdateCoordinator(engine=None).commit("s", 1)
        except UpdateError as err:
            await abort(context, err)
    if kind == "abort_with":
        await abort_with(context, grpc.StatusCode.INVALID_ARGUMENT, "TRAINER_NAME_TOO_LONG", LONG_MESSAGE,
                         {"field": "trainer_name"})
    if kind == "plain":
        await context.abort(grpc.StatusCode.NOT_FOUND, "no reason given")
    if kind == "other_domain":
        info = any_pb2.Any()
        info.Pack(error_details_pb2.ErrorInfo(reason="QUOTA", domain="example.com"))
        await context.abort_with_status(rpc_status.to_status(status_pb2.Status(
            code=grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], message="over quota", details=[info])))
    return b"ok"


async def _call_all(kinds: list[str]) -> dict[str, tuple]:
    """Per kind: (code, details, reason_of, error_info_of) seen by an aio client and by a sync client."""
    server = grpc.aio.server()
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Status", {
        "Fail": grpc.unary_unary_rpc_method_handler(_handle)})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    address = f"127.0.0.1:{port}"
    seen: dict[str, tuple] = {}
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            fail = channel.unary_unary("/test.Status/Fail")
            for kind in kinds:
                try:
                    await fail(kind.encode(), timeout=10)
                except grpc.aio.AioRpcError as err:
                    seen[kind] = (err.code(), err.details(), reason_of(err), error_info_of(err))

        def sync_calls() -> dict[str, tuple]:
            out = {}
            with grpc.insecure_channel(address) as channel:
                fail = channel.unary_unary("/test.Status/Fail")
                for kind in kinds:
                    with pytest.raises(grpc.RpcError) as info:
                        fail(kind.encode(), timeout=10)
                    err = info.value
                    out[kind] = (err.code(), err.details(), reason_of(err), error_info_of(err))
            return out

        synced = await asyncio.to_thread(sync_calls)  # the server's event loop keeps running meanwhile
    finally:
        await server.stop(None)
    assert set(seen) == set(kinds), f"calls that did not fail: {set(kinds) - set(seen)}"
    for kind in kinds:
        assert synced[kind][:3] == seen[kind][:3], f"{kind}: sync {synced[kind][:3]} != aio {seen[kind][:3]}"
    return seen


KINDS = ["status_error", "example_error", "update_error", "abort_with", "plain", "other_domain"]


@pytest.fixture(scope="module")
def answers() -> dict[str, tuple]:
    return asyncio.run(_call_all(KINDS))


def test_a_status_error_reaches_the_client_with_code_message_reason_and_field(answers):
    code, details, reason, info = answers["status_error"]
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details == "examples[0]: 40 tokens is longer than the trainer's max_seq_len 32"
    assert reason == "EXAMPLE_TOO_LONG"
    assert (info.domain, dict(info.metadata)) == ("weightshare.v1", {"field": "examples[0]"})


def test_example_and_update_errors_abort_with_their_reason(answers):
    code, details, reason, info = answers["example_error"]
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details == "examples[3].tokens.input_ids[1] = 600 is not below the vocabulary size 512"
    assert reason == "TOKEN_OUT_OF_VOCABULARY"
    assert dict(info.metadata) == {"field": "examples[3].tokens.input_ids[1]"}
    code, details, reason, info = answers["update_error"]
    assert (code, details, reason) == (grpc.StatusCode.FAILED_PRECONDITION,
                                       "commit without an open update: send begin first", "UPDATE_NOT_OPEN")
    assert dict(info.metadata) == {}


def test_abort_with_keeps_a_message_cut_by_shown_exactly(answers):
    code, details, reason, info = answers["abort_with"]
    assert (code, details, reason) == (grpc.StatusCode.INVALID_ARGUMENT, LONG_MESSAGE, "TRAINER_NAME_TOO_LONG")
    assert "... (500 characters)" in details and dict(info.metadata) == {"field": "trainer_name"}


def test_calls_without_a_weightshare_error_info_have_no_reason(answers):
    assert answers["plain"][:3] == (grpc.StatusCode.NOT_FOUND, "no reason given", None)
    assert answers["other_domain"][:3] == (grpc.StatusCode.RESOURCE_EXHAUSTED, "over quota", None)


# ---------------------------------------------------------------------------------------------------
# The error types
# ---------------------------------------------------------------------------------------------------


def test_the_old_error_types_are_status_errors_with_code_name():
    err = UpdateError(grpc.StatusCode.FAILED_PRECONDITION, "UPDATE_ALREADY_OPEN", "still open")
    assert isinstance(err, StatusError) and str(err) == err.message == "still open"
    assert err.code_name == "FAILED_PRECONDITION" and err.metadata == {}
    with pytest.raises(AttributeError):
        err.code_name = "OK"  # read-only: the code is the source of truth
    example = ExampleError("examples[0].text is bad", reason="EXAMPLE_FIELD_EMPTY", field="examples[0].text")
    assert isinstance(example, StatusError) and isinstance(example, ValueError)
    assert (example.code, example.code_name, example.reason) == (
        grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", "EXAMPLE_FIELD_EMPTY")
    assert example.metadata == {"field": "examples[0].text"} and str(example) == "examples[0].text is bad"
    detail = example.to_status().details[0]
    info = error_details_pb2.ErrorInfo()
    assert detail.Unpack(info) and (info.reason, info.domain) == ("EXAMPLE_FIELD_EMPTY", status.DOMAIN)


# ---------------------------------------------------------------------------------------------------
# The documented reasons are the ones the services use
# ---------------------------------------------------------------------------------------------------


def test_the_reasons_table_is_well_formed():
    table = documented()
    assert len(table) >= 40
    for reason, code in table.items():
        assert re.fullmatch(r"[A-Z][A-Z0-9]*(_[A-Z0-9]+)*", reason), reason
        assert code in grpc.StatusCode.__members__ and code != "OK", f"{reason}: {code} is no error code"


def _alternatives(node: ast.expr) -> list[ast.expr]:
    """`a if c else b` -> [a, b] (recursively); anything else -> [node]."""
    if isinstance(node, ast.IfExp):
        return _alternatives(node.body) + _alternatives(node.orelse)
    return [node]


def _code_name(node: ast.expr, where: str) -> str:
    is_code = (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
               and node.value.attr == "StatusCode")
    assert is_code, f"{where}: the code is not grpc.StatusCode.X: {ast.unparse(node)}"
    return node.attr


# callee -> (index of code among positional args, index of reason, default code)
_SIGNATURES = {"StatusError": (0, 1, None), "UpdateError": (0, 1, None), "abort_with": (1, 2, None),
               "ExampleError": (None, None, "INVALID_ARGUMENT")}


def _used_reasons(path: str) -> list[tuple[str, str, str]]:
    """(reason, code name, where) of every StatusError construction and abort_with call in `path`."""
    used = []
    for call in ast.walk(ast.parse((ROOT / path).read_text())):
        if not isinstance(call, ast.Call):
            continue
        name = getattr(call.func, "id", None) or getattr(call.func, "attr", None)
        if name not in _SIGNATURES:
            continue
        where = f"{path}:{call.lineno}"
        code_at, reason_at, default = _SIGNATURES[name]
        keywords = {k.arg: k.value for k in call.keywords}
        reason = keywords.get("reason") or (call.args[reason_at] if reason_at is not None
                                            and len(call.args) > reason_at else None)
        code = keywords.get("code") or (call.args[code_at] if code_at is not None and len(call.args) > code_at
                                        else None)
        assert reason is not None, f"{where}: {name} without a reason"
        reasons = _alternatives(reason)
        assert all(isinstance(r, ast.Constant) and isinstance(r.value, str) for r in reasons), (
            f"{where}: the reason is not a string literal: {ast.unparse(reason)}")
        codes = [_code_name(c, where) for c in _alternatives(code)] if code is not None else [default]
        assert None not in codes, f"{where}: {name} without a code"
        if len(codes) == 1:
            codes *= len(reasons)
        assert len(codes) == len(reasons), f"{where}: codes and reasons do not pair: {ast.unparse(call)}"
        used += [(r.value, c, where) for r, c in zip(reasons, codes, strict=True)]
    return used


def test_every_reason_the_services_use_is_documented_with_its_code():
    table = documented()
    used = {path: _used_reasons(path) for path in SOURCES}
    assert len(used["trainer_side/data.py"]) >= 20 and len(used["inference_side/updates.py"]) >= 4
    assert len(used["inference_side/servicer.py"]) >= 15 and len(used["trainer_side/service.py"]) >= 12
    for reason, code, where in (u for uses in used.values() for u in uses):
        assert reason in table, f"{where}: reason {reason} is not in weightshare/status.py's table"
        assert table[reason] == code, f"{where}: {reason} answered {code}, documented as {table[reason]}"
    unused = set(table) - {reason for uses in used.values() for reason, _, _ in uses}
    assert not unused, f"documented reasons no service uses: {sorted(unused)}"


def test_the_servicers_abort_only_through_the_status_helpers():
    for path in SERVICERS:
        source = (ROOT / path).read_text()
        assert "context.abort(" not in source and "getattr(grpc.StatusCode" not in source, path
