# cython: language_level=3
"""Compiled common case of ``Hub.handle_text`` and ``Hub._handle`` (optional; ``hub.py`` is
the reference and the fallback, and the unit tests run against both).

``relay(hub, peer, text)`` relays a message addressed (``to``) to a local peer that shares a
room with the sender, as ``Hub._handle`` does: parse, count, route, stamp ``from``, frame,
send, count. It decides before touching anything: when the message is anything else (not
valid JSON, a command or server type, a room message, another node's peer, an error, an
application hook, a client-written ``from``, an integer orjson cannot write back, a type
not yet counted, debug logging), it returns the parsed message (or None if it did not parse
it) and ``Hub._handle`` goes on with it, so nothing is parsed twice on a path it knows.
Returns True when it relayed the message.

``TextHandler(hub).handle_text`` is ``Hub.handle_text`` for that hub (rate admission, the
backlog of a join in flight, then ``relay``, then ``Hub._handle_parsed`` for the rest), one
C call per message instead of two Python frames; ``Hub`` installs it as its ``handle_text``.
``deliver`` is ``Hub._deliver`` (a room's members); ``set_sink`` takes the transport's C
``send`` so frames reach a connection without a method call.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.float cimport PyFloat_AS_DOUBLE
from cpython.pycapsule cimport PyCapsule_GetPointer
from libc.string cimport memchr, memcpy

import orjson

from rtcsignal._slots cimport _get, _offset, _put

from rtcsignal.core.messages import COMMAND_TYPES, MAX_TYPE_LENGTH, RESERVED_TYPES
from rtcsignal.core.metrics import Metrics
from rtcsignal.core.ratelimit import SMALL_MESSAGE, MessageBudget, TokenBucket

cdef extern from *:
    """
    #ifndef RTCSIGNAL_SOURCE_HASH
    #define RTCSIGNAL_SOURCE_HASH ""
    #endif
    """
    const char* RTCSIGNAL_SOURCE_HASH

#: sha256 (16 hex digits) of the .pyx this module was built from (setup.py)
SOURCE_HASH = (<bytes>RTCSIGNAL_SOURCE_HASH).decode("ascii")

cdef object _loads = orjson.loads
cdef object _dumps = orjson.dumps
cdef object _DecodeError = orjson.JSONDecodeError
cdef object _EncodeError = orjson.JSONEncodeError
cdef frozenset _SERVER_TYPES = frozenset(COMMAND_TYPES | RESERVED_TYPES)
cdef Py_ssize_t _MAX_TYPE = MAX_TYPE_LENGTH
cdef Py_ssize_t _SMALL = SMALL_MESSAGE
cdef type _TokenBucket = TokenBucket
cdef type _MessageBudget = MessageBudget


cdef type _Peer = None
cdef Py_ssize_t P_ID, P_SINK, P_BUCKET, P_ROOMS, P_JOINING, P_BACKLOG, P_LIMITED
cdef Py_ssize_t B_TOKENS = _offset(TokenBucket, "tokens")
cdef Py_ssize_t B_LAST = _offset(TokenBucket, "last")
cdef Py_ssize_t B_RATE = _offset(TokenBucket, "rate")
cdef Py_ssize_t B_BURST = _offset(TokenBucket, "burst")
cdef type _Metrics = Metrics
cdef Py_ssize_t M_DELIVERIES = _offset(Metrics, "deliveries")


ctypedef int (*sink_send_t)(object, object) except -1
cdef type _SinkType = None
cdef sink_send_t _sink_send = NULL


def set_sink(cls, capsule):
    """The server's connection class and its compiled ``send`` (a PyCapsule named
    ``rtcsignal.sink_send``): a frame for a sink of exactly that class is handed to the C
    function, without a method call."""
    global _SinkType, _sink_send
    _sink_send = <sink_send_t>PyCapsule_GetPointer(capsule, "rtcsignal.sink_send")
    _SinkType = cls


cdef inline int _send(object sink, object frame) except -1:
    if type(sink) is _SinkType:
        return _sink_send(sink, frame)
    sink.send(frame)
    return 0


def deliver(room, frame, skip=None):
    """``Hub._deliver``: a relayed frame to a room's local members (but ``skip``) and to
    its local joiners in flight; returns how many members got it."""
    cdef Py_ssize_t n = 0
    members = room.members
    for member in ((<dict>members).values() if type(members) is dict else members.values()):
        if member is not skip:
            _send(_get(member, P_SINK) if type(member) is _Peer else member.sink, frame)
            n += 1
    joining = room.joining
    if joining:
        for queued in joining.values():
            queued.append((0, frame))
    return n


def install(peer_cls):
    """Read ``hub.Peer``'s slots in C (hub.py calls this once, after defining it)."""
    global _Peer, P_ID, P_SINK, P_BUCKET, P_ROOMS, P_JOINING, P_BACKLOG, P_LIMITED
    P_ID = _offset(peer_cls, "id")
    P_SINK = _offset(peer_cls, "sink")
    P_BUCKET = _offset(peer_cls, "bucket")
    P_ROOMS = _offset(peer_cls, "rooms")
    P_JOINING = _offset(peer_cls, "joining")
    P_BACKLOG = _offset(peer_cls, "backlog")
    P_LIMITED = _offset(peer_cls, "limited_since")
    _Peer = peer_cls


cdef extern from "Python.h":
    bint PyUnicode_IS_COMPACT_ASCII(object o)
    void* PyUnicode_DATA(object o)
    Py_ssize_t PyUnicode_GET_LENGTH(object o)


cdef const char* _plain(str s, Py_ssize_t* n):
    """The characters of ``s`` if it is ASCII that JSON writes as is (no escape: the peer ids
    this server makes), read in place; else NULL."""
    cdef Py_ssize_t i, k
    cdef const unsigned char* p
    cdef unsigned char c
    if not PyUnicode_IS_COMPACT_ASCII(s):
        return NULL
    k = PyUnicode_GET_LENGTH(s)
    p = <const unsigned char*>PyUnicode_DATA(s)
    for i in range(k):
        c = p[i]
        if c <= 0x20 or c >= 0x7F or c == 0x22 or c == 0x5C:
            return NULL
    n[0] = k
    return <const char*>p


cdef bytes _stamp(object peer_id, dict obj):
    """``orjson.dumps({"from": peer_id, **obj})`` (``obj`` has a ``type``, no ``from``):
    orjson writes compact JSON, so that is ``{"from":"<id>",`` then ``dumps(obj)`` without its
    ``{`` -- spliced in one copy, no dict built -- when the id needs no escaping."""
    cdef bytes body, out
    cdef const char* ident = NULL
    cdef Py_ssize_t n, k = 0
    cdef char* d
    if type(peer_id) is str:
        ident = _plain(<str>peer_id, &k)
    if ident == NULL:
        stamped = {"from": peer_id}
        stamped.update(obj)
        return _dumps(stamped)
    body = _dumps(obj)
    n = len(body)
    out = PyBytes_FromStringAndSize(NULL, n + k + 10)
    d = PyBytes_AS_STRING(out)
    memcpy(d, b'{"from":"', 9)
    memcpy(d + 9, ident, k)
    memcpy(d + 9 + k, b'",', 2)
    memcpy(d + 11 + k, (<const char*>body) + 1, n - 1)
    return out


cdef bint _take(object bucket, object now) except -1:
    """``TokenBucket.take(now)`` (cost 1.0) on a TokenBucket or MessageBudget, in C; ``now``
    is a float (the hub's clock) and goes into ``last`` as is."""
    cdef double tokens = (<double>_get(bucket, B_TOKENS)
                          + (PyFloat_AS_DOUBLE(now) - <double>_get(bucket, B_LAST))
                          * <double>_get(bucket, B_RATE))
    cdef double burst = <double>_get(bucket, B_BURST)
    _put(bucket, B_LAST, now)
    if tokens > burst:
        tokens = burst
    if tokens >= 1.0:
        _put(bucket, B_TOKENS, tokens - 1.0)
        return True
    _put(bucket, B_TOKENS, tokens)
    return False


cdef bint _exponent(bytes body):
    """``messages.stamp_from``'s filter: an ``e+<digit>`` at or after the first ``+`` (orjson
    wrote a float of magnitude >= 1e16: maybe an integer it could not keep)."""
    cdef const char* p = body
    cdef Py_ssize_t n = len(body), i, plus
    cdef const char* found = <const char*>memchr(p, b'+', n)
    if found == NULL:
        return False
    plus = found - p
    if plus == 0:
        return False
    for i in range(plus - 1, n - 2):
        if p[i] == b'e' and p[i + 1] == b'+' and b'0' <= p[i + 2] <= b'9':
            return True
    return False


def relay(hub, peer, text):
    """True (relayed), else the message parsed (a dict) or None; see the module docstring."""
    if hub.debug or type(peer) is not _Peer:
        return None
    metrics = hub.metrics
    return _relay(hub, metrics, metrics.received, metrics.relayed, hub.frame, hub.hooks,
                  peer, text)


cdef object _relay(object hub, object metrics, dict received, dict relayed, object frame,
                   object hooks, object peer, object text):
    """``relay`` for a ``hub.Peer`` sender, the hub's parts given (``TextHandler`` keeps
    them)."""
    cdef dict obj
    cdef Py_ssize_t n
    try:
        parsed = _loads(text)
    except _DecodeError:
        return None
    if type(parsed) is not dict:
        return None
    obj = <dict>parsed
    kind = obj.get("type")
    if type(kind) is not str:
        return None
    n = len(<str>kind)
    if n == 0 or n > _MAX_TYPE:
        return None
    if kind in _SERVER_TYPES:
        return obj
    count = received.get(kind)
    if count is None or kind not in relayed:  # a type not yet labelled: the Python path
        return obj
    if obj.get("room") is not None:
        return obj
    to = obj.get("to")
    if type(to) is not str:
        return obj
    peers = hub.peers
    target = (<dict>peers).get(to) if type(peers) is dict else peers.get(to)
    if target is None or target is peer or type(target) is not _Peer:
        return obj
    mine = _get(peer, P_ROOMS)
    if type(mine) is not dict or not mine:
        return obj
    theirs = _get(target, P_ROOMS)
    for name in <dict>mine:
        if name in theirs:
            break
    else:
        return obj
    if hooks.on_message is not None or "from" in obj:
        return obj
    try:
        body = _stamp(_get(peer, P_ID), obj)
    except _EncodeError:
        return obj
    if _exponent(body):
        return obj
    received[kind] = count + 1
    _send(_get(target, P_SINK), frame(body))
    relayed[kind] += 1
    if type(metrics) is _Metrics:
        _put(metrics, M_DELIVERIES, _get(metrics, M_DELIVERIES) + 1)
    else:
        metrics.deliveries += 1
    return True


cdef class TextHandler:
    """``Hub.handle_text`` of one hub, compiled (see the module docstring). It keeps the
    hub's ``metrics`` (and its two type counters), ``frame``, ``clock`` and ``hooks``: a
    hub's own, fixed when it is made."""

    cdef readonly object hub
    cdef object metrics, frame, clock, hooks
    cdef dict received, relayed

    def __init__(self, hub):
        self.hub = hub
        self.metrics = hub.metrics
        self.received = self.metrics.received
        self.relayed = self.metrics.relayed
        self.frame = hub.frame
        self.clock = hub.clock
        self.hooks = hub.hooks

    def handle_text(self, peer, text):
        """``Hub.handle_text`` (a method, not ``__call__``: called through the bound method
        with the vectorcall protocol, no argument tuple per message)."""
        hub = self.hub
        if hub.debug or type(peer) is not _Peer:  # debug logs every message: the method
            return type(hub).handle_text(hub, peer, text)
        now = self.clock()
        bucket = _get(peer, P_BUCKET)
        size = len(text)
        if size > _SMALL:
            ok = bucket.spend(now, size)
        elif ((type(bucket) is _MessageBudget or type(bucket) is _TokenBucket)
              and type(now) is float):
            ok = _take(bucket, now)
        else:
            ok = bucket.take(now)
        if ok:
            if _get(peer, P_LIMITED) is not None and bucket.tokens >= 1.0:
                _put(peer, P_LIMITED, None)
        else:
            hub._refuse(peer, now, text)
            return
        if _get(peer, P_JOINING) is not None:  # a join is in flight: keep order, after it
            backlog = _get(peer, P_BACKLOG)
            if backlog is None:
                backlog = []
                _put(peer, P_BACKLOG, backlog)
            backlog.append(text)
            return
        obj = _relay(hub, self.metrics, self.received, self.relayed, self.frame, self.hooks,
                     peer, text)
        if obj is not True:
            hub._handle_parsed(peer, text, obj)
