"""Switches that change how fast a run goes, never what it learns: the fast path (`fastpath`:
padded length buckets, compiled layers), whole-step CUDA graphs (`cudagraphs`), CPU speed-ups
(`cpu`), and LoRA layers without an input round trip under mixed precision (`lora`). Each falls back in one line where the machine lacks what it needs; what is tried before
training (a rehearsal, a capture) leaves the run's starting point as it was (`rollback`)."""
