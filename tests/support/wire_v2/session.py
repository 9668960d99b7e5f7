"""Connection state machines for the data protocol, sans-IO (docs/data-protocol.md, "HELLO").

Mutual HMAC-SHA256 challenge/response over a shared cluster secret; the secret never crosses
the wire. With Nc, Ns the two 32-byte nonces and `transcript = msgpack([v, client node,
server node, Nc, Ns])`:
    server proof = HMAC(secret, "lunastor-data server\\0" || transcript)   (in the HELLO answer)
    client proof = HMAC(secret, "lunastor-data client\\0" || transcript)   (in AUTH)
Distinct labels stop a proof from being reflected back; the transcript binds both nonces, the
version and both node names, so no answer can be replayed into another handshake.

`ServerConnection` and `ClientConnection` take bytes in and give bytes out; the asyncio glue
(peer.py) only moves bytes. Until the handshake completes a server answers every other request
`unauthenticated` and closes.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import os
from enum import Enum

import msgpack

from tests.support.wire_v2.messages import (
    ACCEPTED_VERSIONS,
    BIN_WRITE,
    BIN_WRITE_OK,
    BINARY_VERSION,
    MAX_HANDLES,
    MAX_HEADER,
    MAX_PAYLOAD,
    NONCE_SIZE,
    PROTOCOL_VERSION,
    Auth,
    AuthFailed,
    Bind,
    BindNexus,
    BinFrame,
    Frame,
    FrameError,
    FrameReader,
    Hello,
    Nexus,
    Op,
    Request,
    Response,
    Status,
    WireError,
    Write,
    clip_message,
    decode_bin_write,
    decode_request,
    decode_response,
    encode_bin_write,
    encode_bin_write_ok,
    encode_request,
    encode_response,
    response_id,
)

Buffers = list[bytes | memoryview]
PRE_AUTH_MAX_HEADER = 1024  # HELLO and AUTH are ~150 bytes


def _proof(
    secret: bytes,
    label: bytes,
    version: int,
    client: str,
    server: str,
    client_nonce: bytes,
    server_nonce: bytes,
) -> bytes:
    transcript = msgpack.packb([version, client, server, client_nonce, server_nonce])
    return hmac.new(secret, b"lunastor-data " + label + b"\0" + transcript, hashlib.sha256).digest()


def negotiate(peer_version: int) -> int | None:
    """The version both sides speak: ours or the peer's, whichever is older, if we accept it."""
    version = min(peer_version, PROTOCOL_VERSION)
    return version if version in ACCEPTED_VERSIONS else None


class Phase(Enum):
    AWAIT_HELLO = "await_hello"
    AWAIT_AUTH = "await_auth"
    OPEN = "open"
    CLOSED = "closed"


class ServerConnection:
    """One accepted connection. Feed bytes; get authenticated requests; send responses."""

    def __init__(
        self,
        secret: bytes,
        node: str,
        *,
        nonce: bytes | None = None,
        max_payload: int = MAX_PAYLOAD,
    ) -> None:
        if not secret:
            raise ValueError("the cluster secret must not be empty")
        self._secret = secret
        self.node = node
        self._nonce = nonce if nonce is not None else os.urandom(NONCE_SIZE)
        # Until the peer has proved the secret it may send only small, payload-free frames:
        # nobody unauthenticated gets to make us buffer megabytes.
        self._reader = FrameReader(max_header=PRE_AUTH_MAX_HEADER, max_payload=0)
        self._max_payload = max_payload
        self._out: Buffers = []
        self.phase = Phase.AWAIT_HELLO
        self.authenticated = False  # the peer proved the secret (stays True after a close)
        self.peer: str | None = None
        self.version: int | None = None
        self._client_nonce = b""
        self._ops: dict[int, Op] = {}  # request id -> op, for encoding the answer
        self.close_reason: str | None = None
        # version 2: handles bound by the client on this connection
        self._extents: dict[int, tuple[str, int]] = {}
        self._nexuses: dict[int, Nexus] = {}

    @property
    def closed(self) -> bool:
        return self.phase is Phase.CLOSED

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Request]:
        """Requests for the application (only once authenticated). Protocol errors are
        answered here; after a fatal one `closed` is True and the caller closes the socket
        once `data_to_send()` is flushed."""
        if self.closed:
            return []
        try:
            frames = self._reader.feed(data)
        except FrameError as exc:
            self._close(str(exc))
            return []
        return self._requests(frames)

    def get_buffer(self) -> memoryview:
        """Where the socket's next bytes go (asyncio.BufferedProtocol)."""
        return self._reader.get_buffer()

    def buffer_updated(self, nbytes: int) -> list[Request]:
        """`receive_data` for bytes received into `get_buffer()`."""
        if self.closed:
            return []
        try:
            frames = self._reader.buffer_updated(nbytes)
        except FrameError as exc:
            self._close(str(exc))
            return []
        return self._requests(frames)

    def _requests(self, frames: list[Frame | BinFrame]) -> list[Request]:
        requests: list[Request] = []
        for frame in frames:
            try:
                if isinstance(frame, BinFrame):
                    if frame.kind != BIN_WRITE:
                        raise FrameError(f"binary frame {frame.kind:#x} is not a request")
                    req: Request = decode_bin_write(frame, self._extents, self._nexuses)
                else:
                    req = decode_request(frame)
            except FrameError as exc:
                self._close(str(exc))
                break
            except WireError as exc:
                assert exc.request_id is not None
                self._answer_error(exc.request_id, exc)
                if self.phase is not Phase.OPEN:
                    self._close(str(exc))
                    break
                continue
            if self.phase is Phase.OPEN:
                if isinstance(req, Bind | BindNexus):
                    self._bind(req)
                    continue
                self._ops[req.id] = req.OP
                requests.append(req)
            else:
                self._handshake(req)
            if self.closed:
                break
        return requests

    def _bind(self, req: Bind | BindNexus) -> None:
        if self.version is None or self.version < BINARY_VERSION:
            self._answer_error(req.id, WireError(f"{req.OP} needs protocol version 2"), req.OP)
            return
        table: dict[int, tuple[str, int]] | dict[int, Nexus]
        table = self._extents if isinstance(req, Bind) else self._nexuses
        if req.handle not in table and len(table) >= MAX_HANDLES:
            self._answer_error(req.id, WireError(f"more than {MAX_HANDLES} handles"), req.OP)
            return
        if isinstance(req, Bind):
            self._extents[req.handle] = (req.volume, req.extent)
        else:
            self._nexuses[req.handle] = req.nexus
        self._out.extend(encode_response(req.OP, Response(req.id, Status.OK)))

    def send_response(self, resp: Response) -> None:
        op = self._ops.pop(resp.id, None)
        if op is None:
            raise ValueError(f"no outstanding request {resp.id}")
        if self.closed:
            return
        if op is Op.WRITE and resp.status is Status.OK and self._reader.binary:
            self._out.append(encode_bin_write_ok(resp.id, resp.fields["applied_seq"]))
        else:
            self._out.extend(encode_response(op, resp))

    def data_to_send(self) -> Buffers:
        out, self._out = self._out, []
        return out

    def _handshake(self, req: Request) -> None:
        if self.phase is Phase.AWAIT_HELLO and isinstance(req, Hello):
            version = negotiate(req.version)
            if version is None:
                self._out.extend(
                    encode_response(
                        Op.HELLO,
                        Response(
                            req.id,
                            Status.BAD_REQUEST,
                            {
                                "versions": sorted(ACCEPTED_VERSIONS),
                                "message": f"unsupported protocol version {req.version}",
                            },
                        ),
                    )
                )
                self._close(f"unsupported protocol version {req.version}")
                return
            self.version, self.peer, self._client_nonce = version, req.node, req.nonce
            proof = _proof(
                self._secret, b"server", version, req.node, self.node, req.nonce, self._nonce
            )
            fields = {"version": version, "node": self.node, "nonce": self._nonce, "proof": proof}
            self._out.extend(encode_response(Op.HELLO, Response(req.id, Status.OK, fields)))
            self.phase = Phase.AWAIT_AUTH
            return
        if self.phase is Phase.AWAIT_AUTH and isinstance(req, Auth):
            assert self.version is not None and self.peer is not None
            want = _proof(
                self._secret,
                b"client",
                self.version,
                self.peer,
                self.node,
                self._client_nonce,
                self._nonce,
            )
            if hmac.compare_digest(want, req.proof):
                self._out.extend(encode_response(Op.AUTH, Response(req.id, Status.OK)))
                self.phase = Phase.OPEN
                self.authenticated = True
                self._reader.max_header = MAX_HEADER
                self._reader.max_payload = self._max_payload
                self._reader.binary = self.version >= BINARY_VERSION
                return
            self._answer_error(req.id, AuthFailed("wrong cluster secret"), Op.AUTH)
            self._close("client failed authentication")
            return
        self._answer_error(
            req.id, AuthFailed(f"{req.OP} before authentication", request_id=req.id), req.OP
        )
        self._close(f"{req.OP} before authentication")

    def _answer_error(self, rid: int, exc: WireError, op: Op = Op.PING) -> None:
        # Error answers carry only status fields, so the op does not matter for encoding
        # except for statuses that need extra fields (not the ones used here).
        self._out.extend(
            encode_response(op, Response(rid, exc.status, {"message": clip_message(str(exc))}))
        )

    def _close(self, reason: str) -> None:
        self.phase = Phase.CLOSED
        self.close_reason = reason


class ClientConnection:
    """The connecting side. `start()` queues HELLO; requests queue until authenticated."""

    def __init__(
        self,
        secret: bytes,
        node: str,
        *,
        nonce: bytes | None = None,
        max_payload: int = MAX_PAYLOAD,
    ) -> None:
        if not secret:
            raise ValueError("the cluster secret must not be empty")
        self._secret = secret
        self.node = node
        self._nonce = nonce if nonce is not None else os.urandom(NONCE_SIZE)
        self._reader = FrameReader(max_payload=max_payload)
        self._out: Buffers = []
        self._ids = itertools.count(1)
        self._pending: dict[int, Op] = {}
        self._queued: list[Request] = []
        self.phase = Phase.AWAIT_HELLO
        self.version: int | None = None
        self.peer: str | None = None
        self._server_nonce = b""
        self._hello_id = 0
        self._auth_id = 0
        self.offer = PROTOCOL_VERSION  # the version our HELLO offers (tests offer older ones)
        # version 2: the handles we bound on this connection, and our bind requests' ids
        self._extent_handles: dict[tuple[str, int], int] = {}
        self._nexus_handles: dict[Nexus, int] = {}
        self._internal: set[int] = set()

    @property
    def authenticated(self) -> bool:
        return self.phase is Phase.OPEN

    def next_id(self) -> int:
        return next(self._ids)

    def start(self) -> None:
        self._hello_id = self.next_id()
        self._send(Hello(self._hello_id, self.offer, self.node, self._nonce))

    def send_request(self, req: Request) -> None:
        if self.phase is Phase.CLOSED:
            raise ValueError("connection is closed")
        if req.id in self._pending or any(q.id == req.id for q in self._queued):
            raise ValueError(f"request id {req.id} is already in flight")
        if self.phase is Phase.OPEN:
            self._send(req)
        else:
            self._queued.append(req)

    def data_to_send(self) -> Buffers:
        out, self._out = self._out, []
        return out

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Response]:
        """Responses to the application's requests. Raises WireError (AuthFailed when the
        server cannot prove the secret); the connection is then unusable."""
        if self.phase is Phase.CLOSED:
            return []
        try:
            return self._responses(self._reader.feed(data))
        except WireError:
            self.phase = Phase.CLOSED
            raise

    def get_buffer(self) -> memoryview:
        """Where the socket's next bytes go (asyncio.BufferedProtocol)."""
        return self._reader.get_buffer()

    def buffer_updated(self, nbytes: int) -> list[Response]:
        """`receive_data` for bytes received into `get_buffer()`."""
        if self.phase is Phase.CLOSED:
            return []
        try:
            return self._responses(self._reader.buffer_updated(nbytes))
        except WireError:
            self.phase = Phase.CLOSED
            raise

    def _responses(self, frames: list[Frame | BinFrame]) -> list[Response]:
        responses = []
        for frame in frames:
            if isinstance(frame, BinFrame):
                if frame.kind != BIN_WRITE_OK or frame.payload:
                    raise FrameError(f"binary frame {frame.kind:#x} is not an answer")
                _, rid, applied = frame.values
                if self._pending.pop(rid, None) is not Op.WRITE:
                    raise FrameError(f"write answer to request {rid}, not a write")
                responses.append(Response(rid, Status.OK, {"applied_seq": applied}))
                continue
            rid = response_id(frame)
            op = self._pending.pop(rid, None)
            if op is None:
                raise FrameError(f"response to unknown request {rid}")
            resp = decode_response(frame, op)
            if rid == self._hello_id and op is Op.HELLO:
                self._on_hello(resp)
            elif rid == self._auth_id and op is Op.AUTH:
                self._on_auth(resp)
            elif rid in self._internal:
                self._internal.discard(rid)  # a bind: a refusal shows in the write it names
            else:
                responses.append(resp)
        return responses

    def _on_hello(self, resp: Response) -> None:
        if not resp.ok:
            raise AuthFailed(
                f"server refused HELLO: {resp.status} {resp.fields.get('message', '')}"
            )
        version = resp.fields["version"]
        if version not in ACCEPTED_VERSIONS or version > self.offer:
            raise WireError(f"server chose unsupported version {version}")
        peer = resp.fields["node"]
        server_nonce = resp.fields["nonce"]
        want = _proof(self._secret, b"server", version, self.node, peer, self._nonce, server_nonce)
        if not hmac.compare_digest(want, resp.fields["proof"]):
            raise AuthFailed("server does not know the cluster secret")
        self.version, self.peer, self._server_nonce = version, peer, server_nonce
        self._reader.binary = version >= BINARY_VERSION
        self._auth_id = self.next_id()
        proof = _proof(self._secret, b"client", version, self.node, peer, self._nonce, server_nonce)
        self._send(Auth(self._auth_id, proof))
        self.phase = Phase.AWAIT_AUTH

    def _on_auth(self, resp: Response) -> None:
        if not resp.ok:
            raise AuthFailed(f"server refused our proof: {resp.status}")
        self.phase = Phase.OPEN
        queued, self._queued = self._queued, []
        for req in queued:
            self._send(req)

    def _send(self, req: Request) -> None:
        self._pending[req.id] = req.OP
        # a write carrying a `caw` token goes as msgpack: the binary frame has no room for it
        binary = self.version is not None and self.version >= BINARY_VERSION
        if isinstance(req, Write) and binary and not req.token:
            ext_h = self._extent_handles.get((req.volume, req.extent))
            if ext_h is None and len(self._extent_handles) < MAX_HANDLES:
                ext_h = len(self._extent_handles) + 1
                self._extent_handles[(req.volume, req.extent)] = ext_h
                self._bind(Bind(self.next_id(), ext_h, req.volume, req.extent))
            nexus_h = 0
            if req.nexus is not None:
                nexus_h = self._nexus_handles.get(req.nexus, 0)
                if not nexus_h and len(self._nexus_handles) < MAX_HANDLES:
                    nexus_h = len(self._nexus_handles) + 1
                    self._nexus_handles[req.nexus] = nexus_h
                    self._bind(BindNexus(self.next_id(), nexus_h, req.nexus))
            # past MAX_HANDLES bindings a write goes as a msgpack frame, as in version 1
            if ext_h and (nexus_h or req.nexus is None):
                self._out.extend(encode_bin_write(req.id, ext_h, nexus_h, req))
                return
        self._out.extend(encode_request(req))

    def _bind(self, bind: Bind | BindNexus) -> None:
        """Send a binding; its answer is ours (a refusal shows in the writes that use it)."""
        self._internal.add(bind.id)
        self._pending[bind.id] = bind.OP
        self._out.extend(encode_request(bind))

    def fail_pending(self) -> list[int]:
        """Ids of every request that will never be answered (the connection is gone)."""
        internal = (self._hello_id, self._auth_id, *self._internal)
        ids = [rid for rid in self._pending if rid not in internal]
        ids += [q.id for q in self._queued]
        self._pending.clear()
        self._queued.clear()
        self.phase = Phase.CLOSED
        return ids
