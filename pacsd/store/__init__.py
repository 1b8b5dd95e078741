"""Blob store: the interface (blobstore.py) and the file-tree implementation (filetree.py)."""

from pacsd.store.blobstore import BlobStore, RangeReader
from pacsd.store.filetree import FileTreeBlobStore, disk_free, validate_key

__all__ = ["BlobStore", "FileTreeBlobStore", "RangeReader", "disk_free", "validate_key"]
