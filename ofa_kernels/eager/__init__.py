"""Plain-PyTorch implementations of the norm ops' closed forms (the CPU backend)."""
