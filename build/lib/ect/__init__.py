"""ect: Easy Consistency Tuning — EDM-compatible networks, the ECT objective, trainer and samplers."""
__version__ = "0.1.0"
