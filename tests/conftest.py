# Run Triton kernels through the interpreter on CPU. Must be set before triton is imported.
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
