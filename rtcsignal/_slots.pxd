# cython: language_level=3
# __slots__ read and written in C, for the compiled hot path (core/ and server/_speedups.pyx).
#
# A ``__slots__`` attribute is a pointer at a fixed offset in the object, which its class's
# member descriptor records. Looked up by name from C, each read costs a type lookup and a
# descriptor call (a sixth of the relay's time went to such lookups); for instances of the
# exact classes they were computed on (the callers check ``type(o) is cls``), the compiled
# code reads and writes the pointer itself. An unset slot (NULL) raises AttributeError as
# the lookup would. Inline only: nothing to import at run time. setup.py and the loaders hash
# this file with each .pyx, so a change here rebuilds them.

from cpython.object cimport PyObject, PyTypeObject
from cpython.ref cimport Py_INCREF, Py_XDECREF


cdef extern from "Python.h":
    ctypedef struct PyMemberDef:
        int type
        Py_ssize_t offset
    ctypedef struct PyMemberDescrObject:
        PyMemberDef* d_member
    PyTypeObject PyMemberDescr_Type


cdef inline Py_ssize_t _offset(type cls, str name) except -1:
    """Where ``cls``'s slot ``name`` lives in its instances (and its subclasses')."""
    descr = cls.__dict__[name]
    if type(descr) is not <type>&PyMemberDescr_Type:
        raise TypeError(f"{cls.__name__}.{name} is not a __slots__ member")
    if (<PyMemberDescrObject*>descr).d_member.type != 16:  # T_OBJECT_EX: a __slots__ entry
        raise TypeError(f"{cls.__name__}.{name} is not an object slot")
    return (<PyMemberDescrObject*>descr).d_member.offset


cdef inline PyObject** _at(object o, Py_ssize_t offset) noexcept:
    return <PyObject**>((<char*><PyObject*>o) + offset)


cdef inline object _get(object o, Py_ssize_t offset):
    cdef PyObject* v = _at(o, offset)[0]
    if v == NULL:
        raise AttributeError("slot not set")
    return <object>v


cdef inline void _put(object o, Py_ssize_t offset, object value) noexcept:
    cdef PyObject** p = _at(o, offset)
    cdef PyObject* old = p[0]
    Py_INCREF(value)
    p[0] = <PyObject*>value
    Py_XDECREF(old)
