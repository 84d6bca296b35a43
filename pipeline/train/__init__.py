"""Student training on Ray Train: the driver, the worker's loop, the step, the run's checkpoint, the reader
and its batches, collectives and tracking."""
