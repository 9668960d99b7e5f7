"""The stream side of the codec: split a byte stream into PDUs, like h2's frame buffer."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Literal

from crc32c import crc32c

from lunastor.iscsi.errors import DataDigestError, FramingError, HeaderDigestError, RejectReason
from lunastor.iscsi.pdu.codec import DECODERS, decode_pdu, pdu_error
from lunastor.iscsi.pdu.enums import BHS_LENGTH, MAX_AHS_LENGTH
from lunastor.iscsi.pdu.messages import INITIATOR_PDUS, TARGET_PDUS, Buffer, Pdu

_INITIATOR = frozenset(int(cls.opcode) for cls in INITIATOR_PDUS)
_TARGET = frozenset(int(cls.opcode) for cls in TARGET_PDUS)


Frame = tuple[memoryview, int, int, int]  # (buf, AHS length, data start, data length)


class PduReader:
    """Splits a byte stream into PDUs, like h2's frame buffer.

    `feed()` bytes as they arrive; `next_pdu()` (or iteration) returns complete PDUs, or None
    while one is incomplete. It waits for the 48-byte BHS, then for the AHS, header digest,
    padded data segment and data digest. Lengths are checked against the caps before anything
    beyond the header is buffered.

    Errors: `FramingError` / `HeaderDigestError` leave the reader broken (every later call
    raises again: drop the connection). `DataDigestError` and other `RemoteProtocolError`s
    consumed exactly the offending PDU; the next call goes on with the following one.

    `header_digest`, `data_digest` and `max_recv_data_segment_length` may change between PDUs
    (negotiation enables digests after login). `sender` says whose PDUs this stream carries:
    a target's reader refuses target opcodes and vice versa.

    Data segments are memoryviews into the fed bytes objects when a PDU arrived within one
    `feed()`; a PDU split across feeds is joined once, when it is complete.
    """

    def __init__(
        self,
        *,
        max_recv_data_segment_length: int = 8192,
        header_digest: bool = False,
        data_digest: bool = False,
        max_ahs_length: int = 272,
        sender: Literal["initiator", "target", "any"] = "initiator",
    ) -> None:
        self._chunks: deque[memoryview] = deque()
        self._avail = 0
        self._frame: tuple[int, int, int] | None = None  # (ahs length, data length, total)
        self._broken: FramingError | None = None
        self._header_digest = header_digest
        self._data_digest = data_digest
        self._max_data = max_recv_data_segment_length
        self.max_ahs_length = min(max_ahs_length, MAX_AHS_LENGTH)
        self._accept = {"initiator": _INITIATOR, "target": _TARGET}.get(sender)

    # Settings apply from the next PDU not yet framed.
    @property
    def header_digest(self) -> bool:
        return self._header_digest

    @header_digest.setter
    def header_digest(self, value: bool) -> None:
        self._header_digest = value
        self._frame = None

    @property
    def data_digest(self) -> bool:
        return self._data_digest

    @data_digest.setter
    def data_digest(self, value: bool) -> None:
        self._data_digest = value
        self._frame = None

    @property
    def max_recv_data_segment_length(self) -> int:
        return self._max_data

    @max_recv_data_segment_length.setter
    def max_recv_data_segment_length(self, value: int) -> None:
        self._max_data = value
        self._frame = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as PDUs (non-zero at EOF: truncated PDU)."""
        return self._avail

    def feed(self, data: Buffer, *, copy: bool = True) -> None:
        """Add received bytes. A bytearray or memoryview is copied unless `copy=False`: the
        caller then promises not to overwrite it while views of it are alive (the asyncio
        adapter's receive buffers: reused only once unexported, see `buffers.unexported`)."""
        if not data:
            return
        if copy and not isinstance(data, bytes):
            data = bytes(data)  # the caller may reuse a bytearray/memoryview buffer
        self._chunks.append(memoryview(data))
        self._avail += len(data)

    def __iter__(self) -> Iterator[Pdu]:
        while (pdu := self.next_pdu()) is not None:
            yield pdu

    def _front(self, n: int) -> memoryview:
        """The first chunk, made at least `n` bytes long (copies only the bytes it joins)."""
        chunks = self._chunks
        first = chunks[0]
        if len(first) >= n:
            return first
        parts = []
        got = 0
        while got < n:
            c = chunks.popleft()
            if got + len(c) <= n:
                parts.append(c)
                got += len(c)
            else:
                parts.append(c[: n - got])
                chunks.appendleft(c[n - got :])
                got = n
        joined = memoryview(b"".join(parts))
        chunks.appendleft(joined)
        return joined

    def _consume(self, n: int) -> None:
        first = self._chunks[0]
        if len(first) == n:
            self._chunks.popleft()
        else:
            self._chunks[0] = first[n:]
        self._avail -= n

    def _fail(self, exc: FramingError) -> FramingError:
        self._broken = exc
        return exc

    def next_pdu(self) -> Pdu | None:
        frame = self.next_frame()
        if frame is None:
            return None
        return self.decode_frame(frame)

    def next_frame(self) -> Frame | None:
        """The next complete PDU, framed and digest-checked but not decoded: `(buf,
        ahs_length, data_start, data_length)`, `buf` a memoryview starting at its BHS. For a
        caller that looks at the BHS itself before (or instead of) `decode_frame`."""
        if self._broken is not None:
            raise self._broken
        if self._avail < BHS_LENGTH:
            return None
        frame = self._frame
        if frame is None:
            head = self._front(BHS_LENGTH)
            ahs_len = head[4] * 4
            data_len = head[5] << 16 | head[6] << 8 | head[7]
            if ahs_len > self.max_ahs_length:
                raise self._fail(
                    FramingError(
                        f"AHS of {ahs_len} bytes exceeds the {self.max_ahs_length}-byte cap",
                        reason=RejectReason.PROTOCOL_ERROR,
                        header=bytes(head[:BHS_LENGTH]),
                    )
                )
            hd = 4 if self._header_digest else 0
            if hd:
                # the lengths are only trustworthy once the header digest checks out
                if self._avail < BHS_LENGTH + ahs_len + hd:
                    return None
                head = self._front(BHS_LENGTH + ahs_len + hd)
                covered = head[: BHS_LENGTH + ahs_len]
                got = int.from_bytes(
                    head[BHS_LENGTH + ahs_len : BHS_LENGTH + ahs_len + 4], "little"
                )
                if crc32c(covered) != got:
                    raise self._fail(
                        HeaderDigestError("header digest mismatch", header=bytes(head[:BHS_LENGTH]))
                    )
            if data_len > self._max_data:
                raise self._fail(
                    FramingError(
                        f"data segment of {data_len} bytes exceeds "
                        f"MaxRecvDataSegmentLength {self._max_data}",
                        reason=RejectReason.PROTOCOL_ERROR,
                        header=bytes(head[:BHS_LENGTH]),
                    )
                )
            total = BHS_LENGTH + ahs_len + hd + data_len + (-data_len % 4)
            if data_len and self._data_digest:
                total += 4
            frame = self._frame = (ahs_len, data_len, total)
        ahs_len, data_len, total = frame
        if self._avail < total:
            return None
        buf = self._front(total)
        self._consume(total)
        self._frame = None
        start = BHS_LENGTH + ahs_len + (4 if self._header_digest else 0)
        if data_len and self._data_digest:
            padded_end = start + data_len + (-data_len % 4)
            got = int.from_bytes(buf[padded_end : padded_end + 4], "little")
            if crc32c(buf[start:padded_end]) != got:
                raise DataDigestError("data digest mismatch", header=bytes(buf[:BHS_LENGTH]))
        return buf, ahs_len, start, data_len

    def decode_frame(self, frame: Frame) -> Pdu:
        """Decode what `next_frame` returned (and refuse opcodes of the wrong side)."""
        buf, ahs_len, start, data_len = frame
        header = buf[:BHS_LENGTH]
        if self._accept is not None and header[0] & 0x3F not in self._accept:
            opcode = header[0] & 0x3F
            if opcode in DECODERS:
                raise pdu_error(
                    header,
                    f"opcode 0x{opcode:02x} from the wrong side",
                    RejectReason.PROTOCOL_ERROR,
                )
        return decode_pdu(
            header, buf[BHS_LENGTH : BHS_LENGTH + ahs_len], buf[start : start + data_len]
        )
