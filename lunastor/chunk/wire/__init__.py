"""The chunk-to-chunk data protocol (docs/data-protocol.md): messages and frames
(`messages`), the authenticated session state machine (`session`), and the asyncio glue that
moves the bytes (`peer`)."""
