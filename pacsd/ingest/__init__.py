"""Ingest: received data sets checked, read up to the pixel data and framed as Part 10 files."""
