# cython: language_level=3
"""Compiled transport glue (optional; ``connection.py`` and ``service.py`` are the reference
and the fallback, and the tests run the server on both).

On the pairs path every read is one or a few messages, so the Python frames around the
compiled frame reader and relay -- ``Connection.data_received``, ``Session.receive_data``,
``Connection.send``, the service's ``mark_dirty`` and the flush of each dirty connection --
cost as much as the message itself. These are the same functions, statement for statement,
without the frames; ``install_connection`` and ``install_service`` put them on the classes:

- ``data_received(conn, data)``: an open connection's read (anything else: the Python
  ``Connection._receive_other``). The frame reader's fast case (no partial frame or message
  pending) scans here; the rest goes to ``Session.receive_rest`` as ``receive_data`` does.
- ``send(conn, frame)``, ``flush(conn)``: the per-connection send queue.
- ``mark_dirty(service, conn)``, ``flush_dirty(service)``: the once-per-loop-turn flush.
"""

import time

from cpython.pycapsule cimport PyCapsule_New

from rtcsignal._slots cimport _get, _offset, _put

from rtcsignal.core.metrics import Metrics
from rtcsignal.protocol import session as _session_module
from rtcsignal.protocol.frames import OP_BINARY, OP_PING, OP_PONG, OP_TEXT, encode_frame

cdef extern from *:
    """
    #ifndef RTCSIGNAL_SOURCE_HASH
    #define RTCSIGNAL_SOURCE_HASH ""
    #endif
    """
    const char* RTCSIGNAL_SOURCE_HASH

#: sha256 (16 hex digits) of the .pyx this module was built from (setup.py)
SOURCE_HASH = (<bytes>RTCSIGNAL_SOURCE_HASH).decode("ascii")

cdef object _perf_counter = time.perf_counter
cdef long _TEXT = OP_TEXT
cdef long _BINARY = OP_BINARY
cdef long _PING = OP_PING
cdef long _PONG = OP_PONG
cdef long _FRAGMENT = _session_module.FRAGMENT
cdef object _SESSION_OPEN = _session_module.OPEN
cdef object _encode_frame = encode_frame
cdef object _scan = None  # protocol/_speedups.scan_text
cdef object _OPEN = None  # connection.OPEN
cdef object _Connection = None
cdef object _receive_other = None  # Connection._receive_other
cdef object _slow_reader = None  # Connection._slow_reader
cdef long _sample_mask = 0
cdef long _hard_factor = 0


cdef Py_ssize_t C_STATE, C_OWNER, C_SESSION, C_HANDLERS, C_CONTEXT, C_REFUSING, C_OUT, C_FIRST
cdef Py_ssize_t C_TRANSPORT, C_SLOW_TIMER
cdef Py_ssize_t S_BUF, S_MSG, S_READING, S_CHECKED, S_STATE, S_CLOSE_TRANSPORT, S_MAX_SIZE
cdef type _Session = _session_module.Session
cdef type _Metrics = Metrics
cdef Py_ssize_t M_READS = _offset(Metrics, "reads")
cdef Py_ssize_t M_BYTES_IN = _offset(Metrics, "bytes_in")
cdef Py_ssize_t M_BYTES_OUT = _offset(Metrics, "bytes_out")
cdef Py_ssize_t M_STAMP = _offset(Metrics, "stamp")


def install_connection(cls, scan_text, open_state, sample_mask, hard_factor):
    """Put ``data_received``, ``send`` and ``flush`` on ``cls`` (``connection.Connection``,
    whose slots and its Session's they read in C)."""
    global _scan, _OPEN, _Connection, _receive_other, _slow_reader, _sample_mask, _hard_factor
    global C_STATE, C_OWNER, C_SESSION, C_HANDLERS, C_CONTEXT, C_REFUSING, C_OUT, C_FIRST
    global C_TRANSPORT, C_SLOW_TIMER
    global S_BUF, S_MSG, S_READING, S_CHECKED, S_STATE, S_CLOSE_TRANSPORT, S_MAX_SIZE
    C_STATE = _offset(cls, "state")
    C_OWNER = _offset(cls, "owner")
    C_SESSION = _offset(cls, "session")
    C_HANDLERS = _offset(cls, "handlers")
    C_CONTEXT = _offset(cls, "context")
    C_REFUSING = _offset(cls, "refusing")
    C_OUT = _offset(cls, "out")
    C_FIRST = _offset(cls, "first")
    C_TRANSPORT = _offset(cls, "transport")
    C_SLOW_TIMER = _offset(cls, "slow_timer")
    S_BUF = _offset(_Session, "_buf")
    S_MSG = _offset(_Session, "_msg")
    S_READING = _offset(_Session, "reading")
    S_CHECKED = _offset(_Session, "_checked")
    S_STATE = _offset(_Session, "state")
    S_CLOSE_TRANSPORT = _offset(_Session, "close_transport")
    S_MAX_SIZE = _offset(_Session, "max_size")
    _scan = scan_text
    _OPEN = open_state
    _receive_other = cls._receive_other
    _slow_reader = cls._slow_reader
    _sample_mask = sample_mask
    _hard_factor = hard_factor
    _Connection = cls
    cls.data_received = data_received
    cls.send = send
    cls.flush = flush


def install_service(cls):
    """Put ``mark_dirty`` and ``_flush`` on ``cls`` (``service.SignalingService``)."""
    cls.mark_dirty = mark_dirty
    cls._flush = flush_dirty


cdef object _events(object session, object data):
    """``session.receive_data(data)``, its compiled fast case without the Python frame."""
    if (type(session) is _Session and _get(session, S_BUF) is None
            and _get(session, S_MSG) is None and _get(session, S_READING)
            and not _get(session, S_CHECKED) and _get(session, S_STATE) is _SESSION_OPEN
            and not _get(session, S_CLOSE_TRANSPORT)):
        out, pos = _scan(data, _get(session, S_MAX_SIZE))
        if pos == len(data):
            return out
        return session.receive_rest(data, out, pos)
    return session.receive_data(data)


def data_received(self, data):
    """``Connection.data_received``."""
    cdef long reads, code
    _check(self)
    if _get(self, C_STATE) is not _OPEN:
        _receive_other(self, data)
        return
    owner = _get(self, C_OWNER)
    metrics = owner.metrics
    if type(metrics) is _Metrics:
        _put(metrics, M_BYTES_IN, _get(metrics, M_BYTES_IN) + len(data))
        reads = _get(metrics, M_READS) + 1
        _put(metrics, M_READS, reads)
    else:
        metrics.bytes_in += len(data)
        reads = metrics.reads + 1
        metrics.reads = reads
    started = 0.0 if reads & _sample_mask else _perf_counter()
    session = _get(self, C_SESSION)
    events = _events(session, data)
    handlers = _get(self, C_HANDLERS)
    on_text = handlers.text
    ctx = _get(self, C_CONTEXT)
    for op, payload in events:
        code = op
        if code == _TEXT:
            if _get(self, C_REFUSING):
                _put(self, C_REFUSING, False)
            else:
                on_text(ctx, payload)
        elif code == _PONG:
            handlers.admit(ctx, len(payload))
        elif code == _PING:
            if handlers.admit(ctx, len(payload)):
                _send(self, _encode_frame(_PONG, payload))
        elif code == _FRAGMENT:
            if not handlers.admit(ctx, 0):
                _put(self, C_REFUSING, True)
        elif code == _BINARY:
            if _get(self, C_REFUSING):
                _put(self, C_REFUSING, False)
            else:
                handlers.binary(ctx, payload)
        if _get(self, C_STATE) is not _OPEN:
            break
    if session.close_transport:
        self._session_over()
    if started:
        owner.sampled(started)


cdef inline int _check(object self) except -1:
    """The slots are read at ``Connection``'s offsets: ``self`` must be one (or a subclass)."""
    if type(self) is not _Connection and not isinstance(self, _Connection):
        raise TypeError(f"not a Connection: {type(self).__name__}")
    return 0


cdef int _send(object self, object frame) except -1:
    out = _get(self, C_OUT)
    if out is not None:
        (<list>out).append(frame)
        return 0
    first = _get(self, C_FIRST)
    if first is None:
        if _get(self, C_STATE) is not _OPEN:
            return 0
        _put(self, C_FIRST, frame)
        _get(self, C_OWNER).mark_dirty(self)
    else:
        _put(self, C_OUT, [first, frame])
    return 0


#: ``_send`` for the compiled relay (``core/_speedups.set_sink``): a frame to a Connection
#: without a method call.
SINK_SEND = PyCapsule_New(<void*>_send, "rtcsignal.sink_send", NULL)


def send(self, frame):
    """``Connection.send``."""
    _check(self)
    _send(self, frame)


cdef Py_ssize_t _flush(object self) except -1:
    first = _get(self, C_FIRST)
    if first is None:
        return 0
    _put(self, C_FIRST, None)
    out = _get(self, C_OUT)
    if out is None:
        data = first
    else:
        _put(self, C_OUT, None)
        data = b"".join(out)
    transport = _get(self, C_TRANSPORT)
    transport.write(data)
    if (_get(self, C_SLOW_TIMER) is not None and _get(self, C_STATE) is _OPEN
            and transport.get_write_buffer_size()
            > _get(self, C_OWNER).config.max_send_buffer * _hard_factor):
        _slow_reader(self)
    return len(data)


def flush(self):
    """``Connection.flush``."""
    _check(self)
    return _flush(self)


def mark_dirty(self, conn):
    """``SignalingService.mark_dirty``."""
    (<list>self._dirty).append(conn)
    if not self._flush_scheduled:
        self._flush_scheduled = True
        self.loop.call_soon(self._flush)


def flush_dirty(self):
    """``SignalingService._flush``."""
    cdef Py_ssize_t total = 0
    self._flush_scheduled = False
    dirty = self._dirty
    self._dirty = []
    for conn in <list>dirty:
        if type(conn) is _Connection:
            total += _flush(conn)
        else:
            total += conn.flush()
    metrics = self.metrics
    if type(metrics) is not _Metrics:
        metrics.bytes_out += total
        if metrics.stamp:
            metrics.relay_latency.observe(_perf_counter() - metrics.stamp)
            metrics.stamp = 0.0
        return
    _put(metrics, M_BYTES_OUT, _get(metrics, M_BYTES_OUT) + total)
    if _get(metrics, M_STAMP):
        metrics.relay_latency.observe(_perf_counter() - metrics.stamp)
        _put(metrics, M_STAMP, 0.0)
