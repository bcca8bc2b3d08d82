"""CardioScan service."""
