"""Parts for tests, the demo and the bench that stand in for the field: devices, intakes."""
