"""What every kernel launcher shares: whether the kernels run in Triton's interpreter, and a fix that lets
the interpreter of older Triton releases run them with current numpy.

Interpreted or compiled is decided once, when ``@triton.jit`` runs (at the kernel module's import, from
``TRITON_INTERPRET``): ask the kernel object, not the environment, which may have changed since.

Triton 3.6/3.7's interpreter converts a loop bound such as ``tl.cdiv(N, BLOCK)`` to a Python int with
``int(array)`` on a one-element 1-d numpy array; numpy 2.4 made that a ``TypeError`` ("only 0-dimensional
arrays can be converted to Python scalars"), so every kernel with a ``range(...)`` loop fails there. Triton
3.8 fixed it upstream by squeezing the array first; ``_fix_interpreter_index`` applies the same one-line
fix to the older releases, and only to them (the GPU machine's image pairs triton 3.6 with numpy 2.5).
Compiled kernels never reach this code.
"""

from __future__ import annotations

import triton


def interpreting(kernel: object) -> bool:
    """True when ``kernel`` (a ``@triton.jit`` function) runs in Triton's interpreter rather than compiled."""
    return not isinstance(kernel, triton.runtime.JITFunction)


def _needs_index_fix() -> bool:
    major, minor = (int(x) for x in triton.__version__.split(".")[:2])
    return (major, minor) < (3, 8)


def _fix_interpreter_index() -> None:
    """Make ``tensor.__index__`` squeeze its one-element array inside the interpreter (triton < 3.8 only)."""
    if not _needs_index_fix():
        return
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_llama3_triton_fix", False):
        return  # already applied in this process

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        # scope restores attributes last-in first-out, so this override is undone with the rest after each launch.
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_lang_tensor._llama3_triton_fix = True
    interpreter._patch_lang_tensor = patch_lang_tensor


_fix_interpreter_index()
