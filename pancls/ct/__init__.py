"""CT ingestion: scan DICOM headers, select one series per study, build checked HU volumes, write NIfTI."""
