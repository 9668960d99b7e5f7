"""Nanoseconds per call of the codec hot paths: python -m tests.unit.iscsi.bench_pdu"""

from __future__ import annotations

import timeit

from lunastor.iscsi.pdu import (
    R2T,
    DataIn,
    DataOut,
    PduReader,
    ScsiCommand,
    ScsiResponse,
    decode_pdu,
    encode_pdu,
)


def main() -> None:
    payload = memoryview(bytes(65536))
    cmd = b"".join(encode_pdu(ScsiCommand(read=True, itt=1, cdb=bytes(16))))
    dout = b"".join(encode_pdu(DataOut(itt=1, data=payload)))
    cmd_h = cmd[:48]
    dout_h, dout_d = dout[:48], memoryview(dout)[48:]
    din = DataIn(final=True, itt=1, data=payload)
    rsp = ScsiResponse(itt=1, statsn=1, expcmdsn=2, maxcmdsn=3)
    r2t = R2T(itt=1, ttt=2, desired_data_transfer_length=65536)
    stream = (cmd + dout) * 1000
    # one 4 KiB READ as both sides see it: the command out and in, Data-In with status out and in
    read16 = ScsiCommand(read=True, itt=1, expected_data_transfer_length=4096, cdb=bytes(16))
    din4k = DataIn(final=True, status_present=True, itt=1, data=memoryview(bytes(4096)))
    din4k_w = b"".join(encode_pdu(din4k))
    din4k_h, din4k_d = din4k_w[:48], memoryview(din4k_w)[48:]

    def read_round() -> None:
        decode_pdu(encode_pdu(read16)[0])
        decode_pdu(din4k_h, b"", din4k_d)
        encode_pdu(din4k)

    def read_stream() -> None:
        reader = PduReader(max_recv_data_segment_length=65536)
        reader.feed(stream)
        for _ in reader:
            pass

    cases = {
        "decode_pdu SCSI Command": lambda: decode_pdu(cmd_h),
        "decode_pdu Data-Out 64 KiB": lambda: decode_pdu(dout_h, b"", dout_d),
        "encode_pdu Data-In 64 KiB": lambda: encode_pdu(din),
        "encode_pdu Data-In 64 KiB + data digest": lambda: encode_pdu(din, False, True),
        "encode_pdu SCSI Response": lambda: encode_pdu(rsp),
        "encode_pdu R2T": lambda: encode_pdu(r2t),
        "encode_pdu R2T + header digest": lambda: encode_pdu(r2t, True),
        "4 KiB READ: command and Data-In both ways": read_round,
    }
    for name, fn in cases.items():
        n, _ = timeit.Timer(fn).autorange()
        best = min(timeit.repeat(fn, number=n, repeat=5)) / n
        print(f"{name:45s} {best * 1e9:10.0f} ns")
    best = min(timeit.repeat(read_stream, number=1, repeat=5)) / 2000
    print(f"{'PduReader per PDU (cmd + 64 KiB Data-Out)':45s} {best * 1e9:10.0f} ns")


if __name__ == "__main__":
    main()
