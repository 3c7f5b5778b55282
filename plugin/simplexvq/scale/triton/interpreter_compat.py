"""Make Triton's interpreter accept loops bounded by runtime integers under NumPy 2.

The interpreter (``TRITON_INTERPRET=1``) turns every scalar kernel argument into a one-element NumPy array and
converts it back with ``int(array)`` when it bounds a ``range``; NumPy 2 refuses ``int()`` of a 1-d array
("only 0-dimensional arrays can be converted to Python scalars"), so ``for start in range(0, M, BLOCK)`` fails
in triton 3.5's interpreter. This wraps the interpreter's tensor patching so that the conversion reads the single
element instead. It touches only the interpreter, only when the kernels are interpreted, and is idempotent.
"""

from __future__ import annotations

__all__ = ["patch_interpreter"]


def _index(self) -> int:
    return int(self.handle.data.item())


def patch_interpreter() -> None:
    """Install the conversion fix in ``triton.runtime.interpreter`` (no-op if already installed or not needed)."""
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "simplexvq_index_fix", False):
        return

    def patched(tensor) -> None:
        original(tensor)
        tensor.__index__ = _index

    patched.simplexvq_index_fix = True
    interpreter._patch_lang_tensor = patched
