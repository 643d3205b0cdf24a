"""Triton kernels: one backend of the norm and probe ops (``ops/dispatch.py`` loads it; nothing else imports
it). CPU tensors run through Triton's interpreter under ``TRITON_INTERPRET=1``."""
