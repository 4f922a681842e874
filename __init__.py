"""ctun: reach Docker Desktop containers by IP through an authenticated, encrypted L3 tunnel."""

__version__ = "0.1.0"
