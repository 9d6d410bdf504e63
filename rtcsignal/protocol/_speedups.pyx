# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""Compiled hot path of the frame reader (optional; ``frames.py`` and ``session.py`` are the
reference and the fallback, and the unit tests run against both).

- ``unmask(payload, mask)``: ``frames.unmask``, a C loop (8 bytes at a time).
- ``encode_text(payload)``: ``frames.encode_text``, one allocation.
- ``scan_text(data, max_size)``: the longest prefix of ``data`` made of complete, final,
  masked text frames (no RSV bit, at most ``max_size`` bytes, valid UTF-8), unmasked, as
  ``[(OP_TEXT, payload), ...]`` and the offset where it stopped. ``Session.receive_data``
  calls it when no partial frame or fragmented message is pending and hands what follows to
  its own loop, which treats those frames exactly so; anything else (other opcodes,
  fragments, errors, a partial frame) stops the scan, and the Python loop takes over there.
"""

from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.string cimport memcpy

cdef extern from *:
    """
    #ifndef RTCSIGNAL_SOURCE_HASH
    #define RTCSIGNAL_SOURCE_HASH ""
    #endif
    """
    const char* RTCSIGNAL_SOURCE_HASH

#: sha256 (16 hex digits) of the .pyx this module was built from (setup.py)
SOURCE_HASH = (<bytes>RTCSIGNAL_SOURCE_HASH).decode("ascii")

cdef object OP_TEXT = 1


cdef inline void _xor(const uint8_t* src, uint8_t* dst, Py_ssize_t n, const uint8_t* key) noexcept nogil:
    cdef uint8_t k8[8]
    cdef uint64_t k64, w
    cdef Py_ssize_t i = 0
    memcpy(k8, key, 4)
    memcpy(k8 + 4, key, 4)
    memcpy(&k64, k8, 8)
    while i + 8 <= n:
        memcpy(&w, src + i, 8)
        w ^= k64
        memcpy(dst + i, &w, 8)
        i += 8
    while i < n:
        dst[i] = src[i] ^ key[i & 3]
        i += 1


cdef inline bint _ascii(const uint8_t* p, Py_ssize_t n) noexcept nogil:
    cdef uint64_t acc = 0, w
    cdef Py_ssize_t i = 0
    while i + 8 <= n:
        memcpy(&w, p + i, 8)
        acc |= w
        i += 8
    while i < n:
        acc |= p[i]
        i += 1
    return (acc & 0x8080808080808080ULL) == 0


cdef inline const uint8_t* _view(object o, Py_ssize_t* n):
    """Pointer and size of a bytes or bytearray object, NULL for other types."""
    if type(o) is bytes:
        n[0] = PyBytes_GET_SIZE(o)
        return <const uint8_t*>PyBytes_AS_STRING(o)
    if type(o) is bytearray:
        n[0] = PyByteArray_GET_SIZE(o)
        return <const uint8_t*>PyByteArray_AS_STRING(o)
    return NULL


def unmask(payload, mask):
    """XOR ``payload`` with the 4-byte ``mask`` (bytes or bytearray; anything else goes to
    the pure function)."""
    cdef Py_ssize_t n, m
    cdef const uint8_t* p = _view(payload, &n)
    cdef const uint8_t* k = _view(mask, &m)
    if p == NULL or k == NULL or m != 4:
        from rtcsignal.protocol.frames import _unmask_py
        return _unmask_py(payload, mask)
    if n == 0:
        return b""
    out = PyBytes_FromStringAndSize(NULL, n)
    _xor(p, <uint8_t*>PyBytes_AS_STRING(out), n, k)
    return out


def encode_text(payload):
    """An unmasked final text frame of ``payload`` (bytes), header and payload in one object."""
    cdef Py_ssize_t n, h
    cdef const uint8_t* p = _view(payload, &n)
    cdef uint8_t* d
    cdef int i
    if p == NULL:
        from rtcsignal.protocol.frames import _encode_text_py
        return _encode_text_py(payload)
    h = 2 if n < 126 else (4 if n < 65536 else 10)
    out = PyBytes_FromStringAndSize(NULL, n + h)
    d = <uint8_t*>PyBytes_AS_STRING(out)
    d[0] = 0x81
    if n < 126:
        d[1] = <uint8_t>n
    elif n < 65536:
        d[1] = 126
        d[2] = <uint8_t>(n >> 8)
        d[3] = <uint8_t>n
    else:
        d[1] = 127
        for i in range(8):
            d[2 + i] = <uint8_t>((<uint64_t>n) >> (8 * (7 - i)))
    memcpy(d + h, p, n)
    return out


def scan_text(data, Py_ssize_t max_size):
    """``(events, offset)``: the complete, valid, final text frames at the start of ``data``
    (bytes), unmasked; see the module docstring."""
    cdef Py_ssize_t n, pos = 0, head, end
    cdef uint64_t length
    cdef uint8_t b0, b1
    cdef int i
    cdef const uint8_t* buf = _view(data, &n)
    cdef uint8_t* dst
    out = []
    if buf == NULL or type(data) is not bytes:
        return out, 0
    while n - pos >= 2:
        b0 = buf[pos]
        b1 = buf[pos + 1]
        if b0 != 0x81 or not (b1 & 0x80):  # FIN + text, no RSV bit; masked
            break
        length = b1 & 0x7F
        head = pos + 2
        if length == 126:
            if n - pos < 4:
                break
            length = (<uint64_t>buf[head] << 8) | buf[head + 1]
            head += 2
        elif length == 127:
            if n - pos < 10:
                break
            length = 0
            for i in range(8):
                length = (length << 8) | buf[head + i]
            head += 8
        if n - head < 4 or length > <uint64_t>max_size or length > <uint64_t>(n - head - 4):
            break  # partial (the Python loop keeps it), or too big (it fails the session)
        end = head + 4 + <Py_ssize_t>length
        payload = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>length)
        dst = <uint8_t*>PyBytes_AS_STRING(payload)
        _xor(buf + head + 4, dst, <Py_ssize_t>length, buf + head)
        if not _ascii(dst, <Py_ssize_t>length):
            try:
                PyUnicode_DecodeUTF8(<char*>dst, <Py_ssize_t>length, "strict")
            except UnicodeDecodeError:
                break  # the Python loop fails the session with 1007 at this frame
        out.append((OP_TEXT, payload))
        pos = end
    return out, pos
