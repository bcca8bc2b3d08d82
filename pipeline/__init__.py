"""CardioScan pipeline."""
