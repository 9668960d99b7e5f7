"""Helpers shared by the codec tests: hex wire images and a reader that reads them back."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from lunastor.iscsi.errors import FramingError, RemoteProtocolError
from lunastor.iscsi.pdu import Pdu, PduReader


def hexbytes(text: str) -> bytes:
    """Bytes from hex written like the RFC figures: whitespace and `|` are ignored."""
    return bytes.fromhex("".join(text.replace("|", " ").split()))


def read_all(
    chunks: Iterable[bytes], *, header_digest: bool = False, data_digest: bool = False
) -> list[Pdu]:
    """Feed `chunks` one by one into a fresh reader and collect every PDU, checking nothing
    is left over."""
    reader = PduReader(
        sender="any",
        header_digest=header_digest,
        data_digest=data_digest,
        max_recv_data_segment_length=1 << 24,
    )
    out: list[Pdu] = []
    for chunk in chunks:
        reader.feed(chunk)
        out.extend(reader)
    assert reader.buffered == 0
    return out


def one_byte_at_a_time(wire: bytes) -> Sequence[bytes]:
    return [wire[i : i + 1] for i in range(len(wire))]


def drain(reader: PduReader, chunks: Iterable[bytes]) -> list[Pdu | RemoteProtocolError]:
    """Feed chunks one by one, collecting PDUs and the errors raised between them (a framing
    error ends the stream)."""
    events: list[Pdu | RemoteProtocolError] = []
    for chunk in chunks:
        reader.feed(chunk)
        while True:
            try:
                pdu = reader.next_pdu()
            except FramingError as exc:
                events.append(exc)
                return events
            except RemoteProtocolError as exc:
                events.append(exc)
                continue
            if pdu is None:
                break
            events.append(pdu)
    return events
