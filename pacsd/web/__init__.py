"""HTTP: DICOMweb (PS3.18: QIDO-RS, WADO-RS, STOW-RS) and WADO-URI, over the same index, blob
store and ingest pipeline as DIMSE, served by uvicorn inside the daemon's event loop."""
