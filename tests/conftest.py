"""Session-wide test setup.

Triton reads ``TRITON_INTERPRET`` when it is first imported, and importing timm or ``torch._dynamo`` imports it, so
the switch that runs the Triton kernels on CPU tensors (Triton's interpreter) is set here, before any test module
is collected, unless the kernels' tests were pointed at a GPU (``SIMPLEXVQ_TRITON_TEST_DEVICE=cuda``).
"""

import os

if os.environ.get("SIMPLEXVQ_TRITON_TEST_DEVICE") != "cuda":
    os.environ.setdefault("TRITON_INTERPRET", "1")
