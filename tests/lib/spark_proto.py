"""Hand-encoded Spark Connect request messages, without generated code.

Every Spark Connect request starts with session_id (field 1, string) and
user_context (field 2: user_id = 1, user_name = 2). sparkgate checks both
in every request message, so tests that only care about forwarding wrap
their payload as field 15 (bytes) of such a message, and the stand-in
server unwraps it again: what the test sent is what the echo returns.
"""

DEFAULT_SESSION = "00112233-4455-6677-8899-aabbccddeeff"
DEFAULT_USER = "tester"
PAYLOAD_FIELD = 15


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def field_bytes(number, data):
    """A length-delimited field (wire type 2)."""
    return varint(number << 3 | 2) + varint(len(data)) + data


def user_context(user_id=DEFAULT_USER, user_name=None, extra=b""):
    body = b""
    if user_id is not None:
        body += field_bytes(1, user_id.encode())
    if user_name is not None:
        body += field_bytes(2, user_name.encode())
    return body + extra


def request(payload=b"", session_id=DEFAULT_SESSION, user_id=DEFAULT_USER,
            user_name=None):
    """A request message: session_id, user_context, then the payload."""
    msg = field_bytes(1, session_id.encode())
    if user_id is not None or user_name is not None:
        msg += field_bytes(2, user_context(user_id, user_name))
    return msg + field_bytes(PAYLOAD_FIELD, payload)


def _read_varint(data, i):
    n = shift = 0
    while True:
        if i >= len(data) or shift > 63:
            raise ValueError("bad varint")
        b = data[i]
        i += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return n, i


def fields(data):
    """[(number, wire_type, value)] of the top level; value is bytes for
    wire type 2 and an int for varints."""
    out, i = [], 0
    while i < len(data):
        tag, i = _read_varint(data, i)
        number, wt = tag >> 3, tag & 7
        if wt == 0:
            v, i = _read_varint(data, i)
        elif wt == 2:
            n, i = _read_varint(data, i)
            if i + n > len(data):
                raise ValueError("length past the end")
            v, i = data[i:i + n], i + n
        elif wt == 1:
            v, i = data[i:i + 8], i + 8
        elif wt == 5:
            v, i = data[i:i + 4], i + 4
        else:
            raise ValueError("wire type %d" % wt)
        out.append((number, wt, v))
    return out


def unwrap(data):
    """The payload of a message made by request(), or data itself when it is
    not one (raw bytes pass through)."""
    try:
        fs = fields(data)
    except (ValueError, IndexError):
        return data
    payloads = [v for (n, wt, v) in fs if n == PAYLOAD_FIELD and wt == 2]
    if len(payloads) == 1 and any(n == 1 for (n, _, _) in fs):
        return payloads[0]
    return data


def user_id_of(data):
    """The user_id in a request message (None when absent)."""
    for n, wt, v in fields(data):
        if n == 2 and wt == 2:
            for n2, wt2, v2 in fields(v):
                if n2 == 1 and wt2 == 2:
                    return v2.decode()
    return None
