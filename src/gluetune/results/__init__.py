"""A finished run folder and what it does: its layout (`folder`), the task metrics it records
(`metrics`), predicting (`prediction`), evaluating (`evaluation`), GLUE submissions (`submission`),
exporting to plain transformers (`export`), its model card (`card`) and report (`report`), and
pushing it to the hub (`hub`). The run writes these at its end (gluetune.training)."""
