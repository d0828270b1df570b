"""Making errors raised inside the operator visible in the exception the user catches.

MXNet 1.9 calls a custom operator's Python callbacks through C++ and reports a failure there as
a generic ``MXNetError`` that names the callback but not the reason ("Check failed:
reinterpret_cast<CustomOpFBFunc>(params.info->callbacks[kCustomOpForward])(...)"); the Python
exception itself is only printed. This module records the message of each failure inside an
``lgm`` callback and appends it to the generic error MXNet raises for it, so
``except MXNetError as e: print(e)`` shows, for instance,
``lgm forward: ValueError: lgm: label must hold integers in [0, 10), got 12.0 at index 3``.

How a message is tied to its call:

- Shape, type and storage inference and operator creation run in the thread that issued the call,
  and MXNet raises their failure from that same C API call: the message goes to the next error of
  that callback kind raised in that thread.
- Forward and backward run on MXNet's worker threads, and MXNet raises each failure once, at the
  next synchronisation on an array it reached (or ``waitall``). The message goes to an error of
  that kind (forward or backward) raised in the thread that created the operator (the calling
  thread for ``mx.nd.Custom`` and Gluon, the binding thread for executors), oldest first.
- Every message is appended at most once; an error of another kind, another thread's error, and
  an error that does not name a custom-operator callback are returned unchanged.
- Stale messages expire: ``mx.nd.waitall()`` raises the first failure still pending and clears
  every other one in MXNet's engine, so when it raises, every waiting message goes; messages of a
  thread that has ended go with the thread; at most a few per thread and kind wait.

What remains MXNet's own behaviour (``src/operator/custom/custom-inl.h``, ``CustomOperator``):
one exception slot, ``exception_``, for every custom operator in the process. A failing callback
stores its exception there, and the next custom-operator completion to run (``Throw()`` in the
``CustomOperatorWait`` step), whichever call it belongs to, takes it and fails; a second failure
before that overwrites the first. So while custom-operator calls run concurrently, a call with
good input can fail with another call's error (lgm then appends nothing, unless that thread has
a failure of its own waiting), and a failing call can complete without error, its outputs never
written. Since every custom operator's failure has the same text, a failure of another library's
custom operator raised in a thread while an unread ``lgm`` failure of that thread waits cannot be
told apart from it.
"""
import collections
import contextlib
import sys
import threading
import weakref

import mxnet.base as _base

__all__ = ["recording", "note", "STAGE_MARKERS"]

# stage of an lgm callback -> the text MXNet's error names that callback by (custom.cc)
STAGE_MARKERS = {
    "forward": "callbacks[kCustomOpForward]",
    "backward": "callbacks[kCustomOpBackward]",
    "infer_shape": "CustomOpInferShapeFunc",
    "infer_type": "CustomOpInferTypeFunc",
    "infer_storage_type": "CustomOpInferStorageTypeFunc",
    "infer_storage_type_backward": "CustomOpBackwardInferStorageTypeFunc",
    "create_operator": "CustomOpCreateFunc",
}
# failures of these stages are raised by the call that ran them: only the latest one can be due
_SYNCHRONOUS = {"infer_shape", "infer_type", "infer_storage_type",
                "infer_storage_type_backward", "create_operator"}
_WAITING_PER_STAGE = 8

_lock = threading.Lock()
# thread -> {stage: deque of messages}; a thread's entry goes when the thread object does
_pending = weakref.WeakKeyDictionary()


def note(stage, message, thread=None):
    """Record the message of a failed ``stage`` callback of a call issued by ``thread``
    (default: the current thread)."""
    thread = threading.current_thread() if thread is None else thread
    with _lock:
        stages = _pending.setdefault(thread, {})
        waiting = stages.setdefault(stage, collections.deque(
            maxlen=1 if stage in _SYNCHRONOUS else _WAITING_PER_STAGE))
        waiting.append(message)


@contextlib.contextmanager
def recording(stage, thread=None):
    """Record any exception escaping the block (then let it propagate unchanged).

    stage: a key of ``STAGE_MARKERS``. thread: the thread that issued the call (default: the
    current one; forward and backward run on MXNet's threads and pass the operator's creator).
    """
    try:
        yield
    except Exception as exc:
        note(stage, f"lgm {stage}: {type(exc).__name__}: {exc}", thread)
        raise


def _raised_by_waitall(frame):
    """Whether the failing C API call is ``mx.nd.waitall()`` (looked up from ``frame`` out)."""
    for _ in range(4):
        if frame is None:
            return False
        if frame.f_code.co_name == "waitall" and frame.f_globals.get("__name__", "").startswith(
                "mxnet."):
            return True
        frame = frame.f_back
    return False


def _take(text, all_cleared):
    """The message waiting for an error with this text in the current thread, or None.
    all_cleared: MXNet has just cleared every pending failure, so no other message can be due."""
    stage = next((s for s, marker in STAGE_MARKERS.items() if marker in text), None)
    with _lock:
        waiting = _pending.get(threading.current_thread(), {}).get(stage)
        message = waiting.popleft() if stage is not None and waiting else None
        if all_cleared:
            _pending.clear()
    return message


def _install():
    original = _base.get_last_ffi_error
    if getattr(original, "_lgm_wrapped", False):
        return

    def get_last_ffi_error():
        err = original()
        text = str(err)
        message = _take(text, _raised_by_waitall(sys._getframe(1)))
        if message is None:
            return err
        try:
            return type(err)(text + "\n" + message)
        except TypeError:  # an error class with another constructor: leave it as is
            return err

    get_last_ffi_error._lgm_wrapped = True
    _base.get_last_ffi_error = get_last_ffi_error


_install()
