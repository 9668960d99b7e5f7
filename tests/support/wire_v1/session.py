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

from tests.support.wire_v1.messages import (
    ACCEPTED_VERSIONS,
    MAX_HEADER,
    MAX_PAYLOAD,
    NONCE_SIZE,
    PROTOCOL_VERSION,
    Auth,
    AuthFailed,
    FrameError,
    FrameReader,
    Hello,
    Op,
    Request,
    Response,
    Status,
    WireError,
    clip_message,
    decode_request,
    decode_response,
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
        requests = []
        for frame in frames:
            try:
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
                self._ops[req.id] = req.OP
                requests.append(req)
            else:
                self._handshake(req)
            if self.closed:
                break
        return requests

    def send_response(self, resp: Response) -> None:
        op = self._ops.pop(resp.id, None)
        if op is None:
            raise ValueError(f"no outstanding request {resp.id}")
        if not self.closed:
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

    @property
    def authenticated(self) -> bool:
        return self.phase is Phase.OPEN

    def next_id(self) -> int:
        return next(self._ids)

    def start(self) -> None:
        self._hello_id = self.next_id()
        self._send(Hello(self._hello_id, PROTOCOL_VERSION, self.node, self._nonce))

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
            frames = self._reader.feed(data)
            responses = []
            for frame in frames:
                rid = response_id(frame)
                op = self._pending.pop(rid, None)
                if op is None:
                    raise FrameError(f"response to unknown request {rid}")
                resp = decode_response(frame, op)
                if rid == self._hello_id and op is Op.HELLO:
                    self._on_hello(resp)
                elif rid == self._auth_id and op is Op.AUTH:
                    self._on_auth(resp)
                else:
                    responses.append(resp)
            return responses
        except WireError:
            self.phase = Phase.CLOSED
            raise

    def _on_hello(self, resp: Response) -> None:
        if not resp.ok:
            raise AuthFailed(
                f"server refused HELLO: {resp.status} {resp.fields.get('message', '')}"
            )
        version = resp.fields["version"]
        if version not in ACCEPTED_VERSIONS or version > PROTOCOL_VERSION:
            raise WireError(f"server chose unsupported version {version}")
        peer = resp.fields["node"]
        server_nonce = resp.fields["nonce"]
        want = _proof(self._secret, b"server", version, self.node, peer, self._nonce, server_nonce)
        if not hmac.compare_digest(want, resp.fields["proof"]):
            raise AuthFailed("server does not know the cluster secret")
        self.version, self.peer, self._server_nonce = version, peer, server_nonce
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
        self._out.extend(encode_request(req))

    def fail_pending(self) -> list[int]:
        """Ids of every request that will never be answered (the connection is gone)."""
        ids = [rid for rid in self._pending if rid not in (self._hello_id, self._auth_id)]
        ids += [q.id for q in self._queued]
        self._pending.clear()
        self._queued.clear()
        self.phase = Phase.CLOSED
        return ids
