"""Ingest without Ray: listing and reading sources, decoding one file into a shard row or a
quarantine row, and keeping the destination folder whole. ``pipelines.ingest`` runs these
on Ray Data and streams the results into shards."""
