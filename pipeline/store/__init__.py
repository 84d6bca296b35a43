"""Bytes on a local disk or an object store: paths, atomic writes, retries, checksummed Parquet tables,
and the delay layer that makes a local folder answer like an object store."""
