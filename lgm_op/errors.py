"""Making errors raised inside the operator visible in the exception the user catches.

MXNet 1.9 runs a custom operator's callbacks on its own worker threads. An exception there is
printed, and the user gets a generic ``MXNetError`` ("Check failed: ... CustomOpFBFunc ...") at the
next synchronisation point, without the original message. This module records the messages of
failures inside ``lgm`` callbacks, and appends them to that generic error when MXNet raises it,
so ``except MXNetError as e: print(e)`` shows, for instance,
``lgm forward: ValueError: lgm: label must hold integers in [0, 10), got 12.0 at index 3``.
Only errors whose text names a custom-operator callback are extended, and each recorded message is
reported once.
"""
import collections
import contextlib
import threading

import mxnet.base as _base

__all__ = ["recording", "note"]

_lock = threading.Lock()
_pending = collections.deque(maxlen=32)
_MARKERS = ("CustomOpFBFunc", "CustomOp", "custom.cc")


def note(message):
    """Record one failure message for the next generic custom-operator error."""
    with _lock:
        _pending.append(message)


@contextlib.contextmanager
def recording(stage):
    """Record any exception escaping the block (then let it propagate unchanged)."""
    try:
        yield
    except Exception as exc:
        note(f"lgm {stage}: {type(exc).__name__}: {exc}")
        raise


def _take():
    with _lock:
        out = list(_pending)
        _pending.clear()
    return out


def _install():
    original = _base.get_last_ffi_error
    if getattr(original, "_lgm_wrapped", False):
        return

    def get_last_ffi_error():
        err = original()
        text = str(err)
        if any(marker in text for marker in _MARKERS):
            messages = _take()
            if messages:
                try:
                    return type(err)(text + "\n" + "\n".join(messages))
                except TypeError:  # an error class with another constructor: leave it as is
                    return err
        return err

    get_last_ffi_error._lgm_wrapped = True
    _base.get_last_ffi_error = get_last_ffi_error


_install()
