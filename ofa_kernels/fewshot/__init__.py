"""The few-shot application: OFA on a Hugging Face causal LM, built on the kernel floor (``ofa_kernels``).

Read it from the top down: ``cli`` (the ``ofa`` command) and ``runs`` (many runs, resumable) call
``trainer`` (``adapt``: setup, loop, finish), whose step reads as one pass: ``anatomy`` taps the
states, then CE (``objectives.label_ce``), J (``objectives.step_ratio``) and S (``objectives.sharpness``,
``riding`` when the probe rides in the clean pass). Below: ``models`` and ``adapters`` (loading and
saving), ``data`` and ``prompts`` (tasks and their text), ``options`` (every choice of a run, torch-free),
``files`` (atomic writes). The public names are re-exported by ``ofa_kernels``.
"""
