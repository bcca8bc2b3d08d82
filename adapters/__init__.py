"""CardioScan adapters."""
