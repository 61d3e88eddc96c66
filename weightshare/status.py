"""gRPC errors with a stable, machine-readable reason: `StatusError`, `abort`, `abort_with`, `reason_of`.

Every refusal of both services travels as a gRPC status code and a human message (the details string,
unchanged) plus a `google.rpc.Status` in the `grpc-status-details-bin` trailer whose `details` hold one
`google.rpc.ErrorInfo` (domain "weightshare.v1", a reason below, and metadata such as `field`, the
request field at fault, where one is known). Clients in any language branch on the reason, never on
the message text, which may change: Python `reason_of(err)`; Go `status.FromError(err)` then
`st.Details()`; grpcurl / buf curl print the details with the error. Reasons are UPPER_SNAKE_CASE and
stable: a reason is never renamed or given another meaning, only added.

| reason | code | when |
| --- | --- | --- |
| TP_RANK_OUT_OF_RANGE | INVALID_ARGUMENT | tp_rank is not below the engine's tensor-parallel size |
| SESSION_ID_MISSING | INVALID_ARGUMENT | session_id is empty: AttachTrainer first |
| SESSION_NOT_ATTACHED | NOT_FOUND | session_id is unknown: detached, or the inference side restarted |
| SESSION_ID_CHANGED | INVALID_ARGUMENT | an UpdateWeights stream names another session than its first message |
| SESSION_READ_ONLY | PERMISSION_DENIED | a read_only session tried to write (UpdateWeights) |
| WRITER_LEASE_HELD | FAILED_PRECONDITION | another trainer holds the writer lease (attach read_only, or take_over) |
| WRITER_LEASE_LOST | FAILED_PRECONDITION | this session's writer lease was taken over by another trainer |
| BATCH_SIZE_TOO_LARGE | INVALID_ARGUMENT | StreamHandles batch_size over the server's maximum |
| EXPORT_FAILED | FAILED_PRECONDITION | vLLM's workers could not export their weight handles |
| TRAINER_NAME_MISSING | INVALID_ARGUMENT | AttachTrainer without a trainer_name |
| TRAINER_NAME_TOO_LONG | INVALID_ARGUMENT | trainer_name over the server's maximum length |
| HOST_MISMATCH | FAILED_PRECONDITION | host_id is not the serving host: handles only open on that machine |
| INSTANCE_CHANGED | FAILED_PRECONDITION | expected_instance_id is stale: the inference side restarted |
| READ_ONLY_WITH_TAKE_OVER | INVALID_ARGUMENT | read_only and take_over both set |
| UPDATE_ACTION_MISSING | INVALID_ARGUMENT | UpdateWeightsRequest.action is not set |
| MAX_PAUSE_SECONDS_INVALID | INVALID_ARGUMENT | begin.max_pause_duration is negative or not a valid Duration, or (unset) begin.max_pause_seconds is NaN, infinite or negative; `field` says which |
| UPDATE_ALREADY_OPEN | FAILED_PRECONDITION | begin while an update is open (commit or abort it first) |
| UPDATE_NOT_OPEN | FAILED_PRECONDITION | commit or abort without an open update |
| UPDATE_OWNED_BY_OTHER_TRAINER | FAILED_PRECONDITION | commit or abort of an update another trainer began |
| EXAMPLES_EMPTY | INVALID_ARGUMENT | SubmitExamples with no examples |
| TOO_MANY_EXAMPLES | RESOURCE_EXHAUSTED | more examples in one request than the trainer allows: split it |
| PENDING_EXAMPLES_FULL | RESOURCE_EXHAUSTED | the trainer's queue of pending examples is full: wait and retry |
| EXAMPLE_CONTENT_MISSING | INVALID_ARGUMENT | an example sets none of chat, text, tokens |
| EXAMPLE_FIELD_EMPTY | INVALID_ARGUMENT | a required part of an example is empty (messages, segments, input_ids, ...) |
| EXAMPLE_TOO_LONG | INVALID_ARGUMENT | an example exceeds the trainer's max_seq_len (tokens, messages, segments, characters) |
| NO_TRAINING_TARGET | INVALID_ARGUMENT | an example has nothing to train on (no assistant turn, no trained segment, empty mask) |
| LOSS_MASK_LENGTH_MISMATCH | INVALID_ARGUMENT | tokens.loss_mask and tokens.input_ids differ in length |
| TOKEN_OUT_OF_VOCABULARY | INVALID_ARGUMENT | a token id is not below the model's vocabulary size |
| ROLE_INVALID | INVALID_ARGUMENT | a chat message's role is not system, user or assistant |
| CHAT_TEMPLATE_REFUSED | INVALID_ARGUMENT | the served model's chat template raised on these messages |
| CHAT_TEMPLATE_MISSING | FAILED_PRECONDITION | the served model has no chat template (or no tokenizer): submit tokens |
| CHAT_TEMPLATE_UNSUPPORTED | FAILED_PRECONDITION | the chat template does not render turns as prefixes: submit tokens |
| TOKENIZER_MISSING | FAILED_PRECONDITION | the trainer has no tokenizer for text examples: submit tokens |
| EOS_TOKEN_MISSING | FAILED_PRECONDITION | text.add_eos, but the tokenizer has no eos token |
| EXAMPLE_ID_DUPLICATED | INVALID_ARGUMENT | one request holds the same example_id twice |
| EXAMPLE_ID_EXISTS | ALREADY_EXISTS | example_id was already submitted (a retry of an acknowledged example) |
| UPDATE_MODE_UNKNOWN | INVALID_ARGUMENT | overrides.update_mode is not a value of UpdateMode |
| UPDATE_MODE_MISMATCH | FAILED_PRECONDITION | overrides.update_mode differs from the inference side's mode |
| LEARNING_RATE_INVALID | INVALID_ARGUMENT | overrides.learning_rate is negative or NaN |
| OVERRIDES_INVALID | INVALID_ARGUMENT | the training overrides do not make a valid configuration |
| INFERENCE_LINK_LOST | FAILED_PRECONDITION | the trainer lost its inference side for good (lease taken, other model) |
| CHECKPOINT_PATH_INVALID | INVALID_ARGUMENT | SaveCheckpoint path contains a NUL byte or is not absolute |
| CHECKPOINT_PATH_EXISTS | ALREADY_EXISTS | SaveCheckpoint path exists: name a new directory |
| DISK_FULL | RESOURCE_EXHAUSTED | a checkpoint could not be written for lack of space (nothing half-written) |
| CHECKPOINT_WRITE_FAILED | FAILED_PRECONDITION | a checkpoint could not be written for another OS error |
| TOKEN_INVALID | UNAUTHENTICATED | a missing or wrong bearer token (`grpc_util.BearerTokenInterceptor`) |

tests/test_status.py checks that every reason raised or aborted with in the services
is in this table, with its code.
"""

from __future__ import annotations

from typing import NoReturn

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

DOMAIN = "weightshare.v1"
"""`ErrorInfo.domain` of every error the weightshare services answer."""


class StatusError(Exception):
    """A refusal to answer with a gRPC status: `code`, a stable `reason` (see the table above), the
    human `message` (the status details, also `str(err)`) and optional `metadata` (e.g. {"field": ...})."""

    def __init__(
        self, code: grpc.StatusCode, reason: str, message: str, metadata: dict[str, str] | None = None
    ):
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.metadata = dict(metadata or {})

    @property
    def code_name(self) -> str:
        """The code's name ("INVALID_ARGUMENT"), as the errors that predate StatusError had it."""
        return self.code.name

    def to_status(self) -> status_pb2.Status:
        """The `google.rpc.Status` sent in the `grpc-status-details-bin` trailer."""
        info = error_details_pb2.ErrorInfo(reason=self.reason, domain=DOMAIN, metadata=self.metadata)
        detail = any_pb2.Any()
        detail.Pack(info)
        return status_pb2.Status(code=self.code.value[0], message=self.message, details=[detail])


async def abort(context: grpc.aio.ServicerContext, error: StatusError) -> NoReturn:
    """Ends the RPC with `error`'s code and message, and its reason in a `google.rpc.ErrorInfo`."""
    await context.abort_with_status(rpc_status.to_status(error.to_status()))


async def abort_with(
    context: grpc.aio.ServicerContext, code: grpc.StatusCode, reason: str, message: str,
    metadata: dict[str, str] | None = None,
) -> NoReturn:
    """`abort(context, StatusError(code, reason, message, metadata))`: a `context.abort` with a reason."""
    await abort(context, StatusError(code, reason, message, metadata))


def error_info_of(rpc_error: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    """The weightshare `ErrorInfo` of a failed call (sync `grpc.RpcError` or `grpc.aio.AioRpcError`),
    or None when it carries none (another server, a transport error, a proxy that rewrote the status)."""
    try:
        status = rpc_status.from_call(rpc_error)
    except (ValueError, AttributeError):  # code or message differ from the details; not a call
        return None
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            if info.domain == DOMAIN:
                return info
    return None


def reason_of(rpc_error: grpc.RpcError) -> str | None:
    """The stable reason of a failed call ("EXAMPLE_TOO_LONG", ...), or None when it carries none."""
    info = error_info_of(rpc_error)
    return info.reason if info is not None else None
