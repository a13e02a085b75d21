"""Tools that make and change models: convert, optimize, the example models and the TFLite writer they use."""
