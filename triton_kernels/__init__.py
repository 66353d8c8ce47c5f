"""Triton kernels, installed as fastnn.triton_kernels (one file per op: kernels + launchers).

Imported lazily by fastnn.ops.<op>, so `import fastnn` does not import triton."""
