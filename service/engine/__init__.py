"""Engine backends behind one async interface."""
