"""pacsd: an asyncio mini-PACS daemon."""

__version__ = "0.1.0"

# pacsd's implementation identity in A-ASSOCIATE (PS3.7 D.3.3.2): a UUID-derived UID
# (PS3.5 B.2), fixed for the implementation, and a version name of at most 16 chars.
IMPLEMENTATION_CLASS_UID = "2.25.256714617126215983971869433010905249540"
IMPLEMENTATION_VERSION_NAME = "PACSD_" + __version__.replace(".", "")
