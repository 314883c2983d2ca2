"""INT8 and FP16: calibration, range methods, Q/DQ placement and writing."""
