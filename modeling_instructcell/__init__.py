"""InstructCell."""
