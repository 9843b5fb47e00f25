"""Synthetic street scenes (label map + photo), the demo set writer, and `train.py --demo`."""
