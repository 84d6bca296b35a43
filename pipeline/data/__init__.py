"""The data stage: ingest from each source into Parquet image parts, augmentation views that replay
exactly, and each model's input preprocessing."""
