"""Engine runtime: calling a loaded engine with named inputs, and input preprocessing."""
