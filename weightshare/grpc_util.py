"""gRPC plumbing shared by both services: addresses, server options, auth, health and reflection.

Addresses are `unix:///path/to.sock` (the default: handles only make sense on one host) or
`host:port`. A bearer token, when configured, is required in the `authorization` metadata of
every call except health checks and reflection, which ops tools use unauthenticated.
"""

from __future__ import annotations

import hmac
import os
import socket
import stat
from collections.abc import Awaitable, Callable, Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from weightshare.errors import UsageError

# Layouts of big models run to ~1 MB and handle batches are bounded, but leave generous room.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # Keepalive lets each side notice a dead peer on an idle update stream within seconds.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
SERVER_OPTIONS = CHANNEL_OPTIONS + [
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
    # A peer stalled by CPU contention fires overdue keepalive pings back to back; with strikes counted the
    # server would answer GOAWAY too_many_pings and break an open update stream. Ping floods are not a
    # threat on a unix socket or loopback.
    ("grpc.http2.max_ping_strikes", 0),
]
_UNAUTHENTICATED_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def default_socket_address(name: str) -> str:
    """`unix://` address under $XDG_RUNTIME_DIR (or /tmp) for the service called `name`."""
    base = os.environ.get("XDG_RUNTIME_DIR") or "/tmp"
    return f"unix://{os.path.join(base, f'weightshare-{name}.sock')}"


class InvalidAddress(UsageError, ValueError):
    """An address that is neither unix:///abs/path nor host:port."""


def validate_address(address: str) -> str:
    """Return `address` if it is `unix:///abs/path` or `host:port`, else raise InvalidAddress saying why."""
    if address.startswith("unix://"):
        path = address[len("unix://"):]
        if not path.startswith("/"):
            raise InvalidAddress(f"unix socket address {address!r} must be absolute: unix:///path/to.sock")
        return address
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise InvalidAddress(f"address {address!r} is neither unix:///path/to.sock nor host:port")
    return address


class AddressInUse(UsageError, RuntimeError):
    """A live server already listens on the address (or a unix path exists and is not a socket)."""


def ensure_can_listen(address: str, flag: str = "--grpc") -> None:
    """Fails fast, before minutes of model loading, if a server could not bind `address`.

    Removes a unix socket left by a dead server; raises AddressInUse (naming `flag`) when a live
    process holds the socket or the TCP port.
    """
    validate_address(address)
    if address.startswith("unix://"):
        remove_stale_socket(address, flag)
        return
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds: TIME_WAIT is no conflict
        try:
            probe.bind((host, int(port)))
        except OSError as err:
            raise AddressInUse(f"cannot listen on {address}: {err.strerror}: stop what uses it or pass another "
                               f"address ({flag})") from None


def remove_stale_socket(address: str, flag: str = "--grpc") -> None:
    """Removes a socket file left by a server that died; refuses one a live server still listens on.

    Taking over a live server's path would leave it running and unreachable (a second `train` on the
    default address did exactly that).
    """
    if not address.startswith("unix://"):
        return
    path = address[len("unix://"):]
    if not os.path.lexists(path):
        return
    if not stat.S_ISSOCK(os.lstat(path).st_mode):
        raise AddressInUse(f"{path} exists and is not a socket: remove it or pass another address ({flag})")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(2.0)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)  # nobody listens: left by a crash
            return
        except OSError as err:
            raise AddressInUse(f"cannot tell whether {path} is in use ({err}): pass another address") from None
    raise AddressInUse(
        f"another live process serves unix://{path}: stop it first, or pass another address ({flag})"
    )


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
SHOWN_CHARACTERS = 100


def shown(value: str, limit: int = SHOWN_CHARACTERS) -> str:
    """`repr(value)` for an error message, cut to `limit` characters of the value.

    Status details travel in an HTTP/2 trailer that clients refuse beyond 8-16 KB (percent-encoded, so
    non-ASCII counts triple): echoing a client's 64 KB string would turn a precise error into
    RESOURCE_EXHAUSTED "metadata size exceeds limit".
    """
    text = repr(value)
    if len(text) <= limit + 2:
        return text
    return f"{text[:limit]}... ({len(value)} characters)"


def refuse_open_exposure(address: str, token: str | None, allowed: bool) -> None:
    """A service reachable beyond this host must require a token (unless the operator says otherwise)."""
    if address.startswith("unix://") or token or allowed:
        return
    host = address.rpartition(":")[0].strip("[]")
    if host not in LOOPBACK_HOSTS:
        raise UsageError(
            f"{address} is reachable beyond this host and no token is set: pass --token (or set "
            "WEIGHTSHARE_TOKEN), listen on a unix socket or 127.0.0.1, or pass --allow-unauthenticated"
        )


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls whose `authorization` metadata is not `Bearer <token>` (health/reflection exempt)."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

        async def deny(request, context: grpc.aio.ServicerContext):
            from weightshare.status import abort_with

            await abort_with(
                context, grpc.StatusCode.UNAUTHENTICATED, "TOKEN_INVALID",
                "missing or wrong bearer token: send metadata 'authorization: Bearer <token>' "
                "(the server's --token / WEIGHTSHARE_TOKEN)",
            )

        self._deny_unary = grpc.unary_unary_rpc_method_handler(deny)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if details.method.startswith(_UNAUTHENTICATED_SERVICES):
            return await continuation(details)
        supplied = dict(details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(supplied.encode(), self._expected):
            return await continuation(details)
        return self._deny_unary


def create_server(token: str | None) -> grpc.aio.Server:
    interceptors = [BearerTokenInterceptor(token)] if token else []
    return grpc.aio.server(options=SERVER_OPTIONS, interceptors=interceptors)


def add_health_and_reflection(
    server: grpc.aio.Server, service_names: Iterable[str]
) -> health.aio.HealthServicer:
    """Registers grpc.health.v1 (every service SERVING) and server reflection; returns the health servicer."""
    names = list(service_names)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(names + [health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    return health_servicer


async def mark_serving(health_servicer: health.aio.HealthServicer, service_names: Iterable[str]) -> None:
    await set_health(health_servicer, service_names, serving=True)


async def set_health(health_servicer: health.aio.HealthServicer, service_names: Iterable[str], serving: bool) -> None:
    """SERVING or NOT_SERVING for the server as a whole ("") and each of `service_names`."""
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ["", *service_names]:
        await health_servicer.set(name, status)


async def start_server(
    add_servicer: Callable[[object, grpc.aio.Server], None], servicer: object, service_name: str,
    address: str, token: str | None,
) -> tuple[grpc.aio.Server, str, health.aio.HealthServicer]:
    """Serves `servicer` with health (SERVING once started), reflection and optional token on `address`.

    `add_servicer` is the generated `add_FooServiceServicer_to_server`. Returns the server, the bound
    address (port 0 resolved) and the health servicer (to report NOT_SERVING later)."""
    server = create_server(token)
    add_servicer(servicer, server)
    health_servicer = add_health_and_reflection(server, [service_name])
    bound = bind(server, address)
    await server.start()
    if address.startswith("unix://"):
        # Only this user may connect (connecting needs write permission): handles open weight memory.
        os.chmod(address[len("unix://"):], 0o600)
    await mark_serving(health_servicer, [service_name])
    return server, bound, health_servicer


def bind(server: grpc.aio.Server, address: str) -> str:
    """Binds insecurely (loopback or unix socket) and returns the bound address (port 0 resolved)."""
    validate_address(address)
    remove_stale_socket(address)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as err:  # grpc says only "Failed to bind"
        raise AddressInUse(f"cannot listen on {address} ({err}): stop what uses it or pass another address") from None
    if address.startswith("unix://"):
        return address
    host = address.rpartition(":")[0]
    return f"{host}:{port}"


def call_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def open_sync_channel(address: str) -> grpc.Channel:
    """Blocking channel (the trainer's torch loop is synchronous)."""
    return grpc.insecure_channel(validate_address(address), options=CHANNEL_OPTIONS)
