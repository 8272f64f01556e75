"""A task's examples: read from the hub, a local GLUE folder or plain files (`loading`), turned
into model inputs and cached (`tokenizing`), and batched by length for N processes (`sampling`)."""
