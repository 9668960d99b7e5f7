"""Text negotiation in Full Feature Phase, mainly SendTargets discovery (RFC 7143 appendix C).

`TextNegotiator` is one connection's side of Text Request/Response exchanges, sans-IO: feed
it a `TextStep` per Text Request, send back the `TextReply`. It reassembles requests sent
with the C bit, and splits answers longer than the initiator's MaxRecvDataSegmentLength over
several Text Responses: every response but the last has F=0, C=1 and a Target Transfer Tag
the initiator echoes in an empty Text Request to get the next part; the last has F=1 and
TTT 0xffffffff.

SendTargets answers, for the targets this initiator may see:
- `SendTargets=All` (discovery sessions only): every visible target;
- `SendTargets=<iSCSI name>`: that target if visible, else nothing;
- `SendTargets=` (empty, normal sessions): the session's own target.
Each target is `TargetName=<name>` followed by one `TargetAddress=<host>:<port>,<tpgt>` per
portal. Anything else is `SendTargets=Reject`. Other keys get the FFP answers of `params`
(login-only keys `Irrelevant`, unknown keys `NotUnderstood`); a MaxRecvDataSegmentLength
declaration is reported in `TextReply.max_send_data_segment_length`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from lunastor.iscsi.errors import RejectReason, RemoteProtocolError
from lunastor.iscsi.params import REJECT, ParamNegotiator, TargetSettings, Use
from lunastor.iscsi.pdu import RESERVED_TAG, TextRequest, TextResponse
from lunastor.iscsi.text import encode_text, parse_text

MAX_TEXT_REQUEST = 64 * 1024  # cap on a reassembled C-bit request


@dataclass(frozen=True, slots=True)
class TargetPortals:
    """A target and the portals it can be reached at, as `host:port,tpgt` strings."""

    name: str
    addresses: tuple[str, ...]


def portal_address(host: str, port: int = 3260, tpgt: int = 1) -> str:
    """`host:port,tpgt`, with IPv6 literals in brackets (RFC 7143 13.8)."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port},{tpgt}"


def sendtargets_pairs(
    value: str,
    visible: Sequence[TargetPortals],
    *,
    discovery: bool,
    session_target: str | None = None,
) -> list[tuple[str, str]]:
    """The answer to one `SendTargets=<value>`."""
    if value == "All":
        if not discovery:
            return [("SendTargets", REJECT)]
        chosen = list(visible)
    elif value == "":
        if discovery or session_target is None:
            return [("SendTargets", REJECT)]
        chosen = [t for t in visible if t.name == session_target]
    else:
        chosen = [t for t in visible if t.name == value]
    pairs: list[tuple[str, str]] = []
    for target in chosen:
        pairs.append(("TargetName", target.name))
        pairs.extend(("TargetAddress", address) for address in target.addresses)
    return pairs


@dataclass(frozen=True, slots=True)
class TextStep:
    """The fields of one Text Request the negotiator needs."""

    final: bool
    cont: bool
    itt: int
    ttt: int
    data: bytes = b""

    @classmethod
    def from_pdu(cls, pdu: TextRequest) -> TextStep:
        return cls(final=pdu.final, cont=pdu.cont, itt=pdu.itt, ttt=pdu.ttt, data=bytes(pdu.data))


@dataclass(frozen=True, slots=True)
class TextReply:
    """One Text Response; `done` when it ends the exchange (F=1)."""

    final: bool
    cont: bool
    itt: int
    ttt: int
    data: bytes = b""
    max_send_data_segment_length: int | None = None  # a new declaration by the initiator

    @property
    def done(self) -> bool:
        return self.final

    def to_pdu(self, *, statsn: int, expcmdsn: int, maxcmdsn: int) -> TextResponse:
        return TextResponse(
            final=self.final,
            cont=self.cont,
            itt=self.itt,
            ttt=self.ttt,
            statsn=statsn,
            expcmdsn=expcmdsn,
            maxcmdsn=maxcmdsn,
            data=self.data,
        )


def _bad(message: str) -> RemoteProtocolError:
    return RemoteProtocolError(message, reason=RejectReason.INVALID_PDU_FIELD)


class TextNegotiator:
    """One connection's Text Request/Response exchanges in Full Feature Phase.

    `visible()` returns the targets (with portals) this session's initiator may see, asked
    afresh for every SendTargets so that ACL changes show up at once.
    """

    def __init__(
        self,
        visible: Callable[[], Sequence[TargetPortals]],
        *,
        discovery: bool,
        session_target: str | None = None,
        max_send_data_segment_length: int = 8192,
        settings: TargetSettings | None = None,
    ) -> None:
        self._visible = visible
        self.discovery = discovery
        self.session_target = session_target
        self.max_send_data_segment_length = max_send_data_segment_length
        self._settings = settings or TargetSettings()
        self._itt: int | None = None  # the exchange in progress
        self._ttt = RESERVED_TAG  # the tag the initiator must echo to continue it
        self._inbox = b""
        self._outbox = b""
        self._next_tag = 1

    def _new_tag(self) -> int:
        tag = self._next_tag
        self._next_tag = self._next_tag % 0xFFFFFFFE + 1  # never 0xffffffff
        return tag

    def step(self, step: TextStep) -> TextReply:
        """Answer one Text Request. Raises RemoteProtocolError (answer with Reject) for a
        request that continues no exchange of ours, or malformed text."""
        if step.final and step.cont:
            raise _bad("Text Request with both F and C bits")
        if step.ttt == RESERVED_TAG or step.itt != self._itt:
            # a new exchange (a TTT of 0xffffffff also resets one in progress, RFC 7143 11.10.4)
            if step.ttt != RESERVED_TAG:
                raise _bad(f"Text Request TTT {step.ttt:#x} continues no exchange")
            self._itt, self._inbox, self._outbox = step.itt, b"", b""
        elif step.ttt != self._ttt:
            raise _bad(f"Text Request TTT {step.ttt:#x}, expected {self._ttt:#x}")
        if self._outbox:
            if step.data:
                raise _bad("keys sent while our response was being continued")
            return self._send_next(step.itt)
        if len(self._inbox) + len(step.data) > MAX_TEXT_REQUEST:
            raise _bad("text request too long")
        self._inbox += step.data
        if step.cont:
            # more request text to come: an empty response with a tag to continue with
            self._ttt = self._new_tag()
            return TextReply(final=False, cont=False, itt=step.itt, ttt=self._ttt)
        pairs = parse_text(self._inbox)
        self._inbox = b""
        answers, declared = self._answer(pairs)
        self._outbox = encode_text(answers)
        if not step.final and len(self._outbox) <= self.max_send_data_segment_length:
            # the initiator did not end the negotiation (F=0): answer and keep it open
            data, self._outbox = self._outbox, b""
            self._ttt = self._new_tag()
            return TextReply(
                final=False,
                cont=False,
                itt=step.itt,
                ttt=self._ttt,
                data=data,
                max_send_data_segment_length=declared,
            )
        if not self._outbox:
            return self._finish(step.itt, b"", declared)
        return self._send_next(step.itt, declared)

    def _answer(self, pairs: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], int | None]:
        params = ParamNegotiator(self._settings, leading=True)
        answers: list[tuple[str, str]] = []
        for key, value in pairs:
            if key == "SendTargets":
                answers += sendtargets_pairs(
                    value,
                    self._visible(),
                    discovery=self.discovery,
                    session_target=self.session_target,
                )
                continue
            answer = params.answer(key, value, Use.FULL_FEATURE)
            if answer is not None:
                answers.append((key, answer))
        declared = params.values.get("MaxRecvDataSegmentLength")
        if declared is not None:
            self.max_send_data_segment_length = int(declared)
        return answers, int(declared) if declared is not None else None

    def _send_next(self, itt: int, declared: int | None = None) -> TextReply:
        limit = self.max_send_data_segment_length
        chunk, self._outbox = self._outbox[:limit], self._outbox[limit:]
        if not self._outbox:
            return self._finish(itt, chunk, declared)
        self._ttt = self._new_tag()
        return TextReply(
            final=False,
            cont=True,
            itt=itt,
            ttt=self._ttt,
            data=chunk,
            max_send_data_segment_length=declared,
        )

    def _finish(self, itt: int, data: bytes, declared: int | None) -> TextReply:
        self._itt, self._ttt = None, RESERVED_TAG
        return TextReply(
            final=True,
            cont=False,
            itt=itt,
            ttt=RESERVED_TAG,
            data=data,
            max_send_data_segment_length=declared,
        )
